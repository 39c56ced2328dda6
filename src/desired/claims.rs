//! Claims (docs/ARCHITECTURE.md, "Claims"): a holder protects a service until a time.
//! While any claim on a service lives it is wanted and is never stopped, parked or
//! preempted; an expired claim is pruned and counts for nothing.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::ServiceName;
use crate::utc::UtcTime;

/// Who holds a claim: free text people recognise (`render-job-42`), 1-200 characters,
/// no control characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Holder(String);

impl Holder {
    pub fn parse(raw: &str) -> Result<Self, String> {
        Self::try_from(raw.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Holder {
    type Error = String;

    fn try_from(raw: String) -> Result<Self, String> {
        let length = raw.chars().count();
        if raw.trim().is_empty() || length > 200 || raw.chars().any(char::is_control) {
            return Err(format!(
                "claim holder {raw:?} is invalid: use 1-200 characters, not only spaces, no control characters"
            ));
        }
        Ok(Self(raw))
    }
}

impl Serialize for Holder {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One claim, as the desired-state file lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    pub service: ServiceName,
    pub holder: Holder,
    pub until: UtcTime,
}

impl Claim {
    pub fn lives_at(&self, now: UtcTime) -> bool {
        self.until > now
    }

    /// Seconds it has left at `now` (0 once expired).
    pub fn seconds_left(&self, now: UtcTime) -> u64 {
        self.until.epoch_s().saturating_sub(now.epoch_s())
    }
}

impl fmt::Display for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "claim on {} by {:?} until {}",
            self.service, self.holder.0, self.until
        )
    }
}

/// Why a claim ended, for the `claim_ended` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimEnd {
    /// Its holder released it (the API, or a hand edit that removed it).
    Released,
    /// Its time ran out.
    Expired,
    /// A forced stop ended it.
    Forced,
}

/// What became of one claim between two desired states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimChange {
    Taken(Claim),
    Renewed(Claim),
    Ended { claim: Claim, why: ClaimEnd },
}

/// The claims taken, renewed and ended from `before` to `after`. One that is gone ended
/// `why` unless its time had run out by `now`: then it expired.
pub fn changes(before: &[Claim], after: &[Claim], now: UtcTime, why: ClaimEnd) -> Vec<ClaimChange> {
    let same = |a: &Claim, b: &Claim| a.service == b.service && a.holder == b.holder;
    let mut out = Vec::new();
    for claim in after {
        match before.iter().find(|old| same(old, claim)) {
            None => out.push(ClaimChange::Taken(claim.clone())),
            Some(old) if old.until != claim.until => out.push(ClaimChange::Renewed(claim.clone())),
            Some(_) => {}
        }
    }
    for claim in before {
        if !after.iter().any(|new| same(new, claim)) {
            let why = if claim.lives_at(now) {
                why
            } else {
                ClaimEnd::Expired
            };
            out.push(ClaimChange::Ended {
                claim: claim.clone(),
                why,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(service: &str, holder: &str, until: u64) -> Claim {
        Claim {
            service: ServiceName::parse(service).unwrap(),
            holder: Holder::parse(holder).unwrap(),
            until: UtcTime::from_epoch_s(until),
        }
    }

    #[test]
    fn holders_must_say_something() {
        assert!(Holder::parse("render-job-42").is_ok());
        for bad in ["", "   ", "a\nb", &"x".repeat(201)] {
            let error = Holder::parse(bad).unwrap_err();
            assert!(error.contains("1-200 characters"), "{error}");
        }
    }

    #[test]
    fn a_claim_lives_until_its_time() {
        let c = claim("comfyui", "me", 100);
        assert!(c.lives_at(UtcTime::from_epoch_s(99)));
        assert!(!c.lives_at(UtcTime::from_epoch_s(100)));
        assert_eq!(c.seconds_left(UtcTime::from_epoch_s(40)), 60);
        assert_eq!(c.seconds_left(UtcTime::from_epoch_s(400)), 0);
    }

    #[test]
    fn changes_name_taken_renewed_and_ended_with_why() {
        let now = UtcTime::from_epoch_s(50);
        let before = [
            claim("a", "kept", 100),
            claim("a", "renewed", 100),
            claim("b", "released", 100),
            claim("b", "expired", 50),
        ];
        let after = [
            claim("a", "kept", 100),
            claim("a", "renewed", 200),
            claim("c", "new", 100),
        ];
        assert_eq!(
            changes(&before, &after, now, ClaimEnd::Released),
            [
                ClaimChange::Renewed(claim("a", "renewed", 200)),
                ClaimChange::Taken(claim("c", "new", 100)),
                ClaimChange::Ended {
                    claim: claim("b", "released", 100),
                    why: ClaimEnd::Released
                },
                ClaimChange::Ended {
                    claim: claim("b", "expired", 50),
                    why: ClaimEnd::Expired
                },
            ]
        );
    }
}
