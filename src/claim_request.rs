//! The claim API's query (`?holder=H&ttl_s=N`) checked into a claim: 400 `bad_request`
//! naming what is wrong, before anything is asked of the reconciler.

use crate::clock::now_ms;
use crate::config::ServiceName;
use crate::desired::{Claim, Holder};
use crate::transition::TransitionError;
use crate::utc::UtcTime;

/// The longest claim: a day. Longer work renews.
pub const MAX_TTL_S: u64 = 86_400;

/// A claim on `service` for `ttl_s` seconds from now.
pub fn claim(
    service: ServiceName,
    holder: Option<String>,
    ttl_s: Option<String>,
) -> Result<Claim, TransitionError> {
    let holder = self::holder(holder)?;
    let ttl_s = ttl(ttl_s.as_deref())?;
    Ok(Claim {
        service,
        holder,
        until: UtcTime::at_or_after_ms(now_ms()).plus_s(ttl_s),
    })
}

pub fn holder(raw: Option<String>) -> Result<Holder, TransitionError> {
    let raw = raw.ok_or_else(|| bad("?holder=H is required: who holds the claim (free text)"))?;
    Holder::parse(&raw).map_err(|detail| bad(&detail))
}

/// `ttl_s`: whole seconds, 1 to [`MAX_TTL_S`].
pub fn ttl(raw: Option<&str>) -> Result<u64, TransitionError> {
    let raw = raw.ok_or_else(|| {
        bad("?ttl_s=N is required: how long the claim lasts, in seconds (1 to 86400)")
    })?;
    match raw.parse::<u64>() {
        Ok(seconds) if (1..=MAX_TTL_S).contains(&seconds) => Ok(seconds),
        _ => Err(bad(&format!(
            "ttl_s={raw:?} is invalid: give whole seconds from 1 to {MAX_TTL_S} (a day); renew to hold longer"
        ))),
    }
}

fn bad(detail: &str) -> TransitionError {
    TransitionError::BadRequest {
        detail: detail.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_and_holder_are_required_and_checked() {
        assert_eq!(ttl(Some("600")).unwrap(), 600);
        for raw in [
            None,
            Some("0"),
            Some("86401"),
            Some("-1"),
            Some("1.5"),
            Some("abc"),
        ] {
            let error = ttl(raw).unwrap_err();
            assert_eq!(error.http_status(), 400, "{raw:?}");
            assert_eq!(error.body()["kind"], "bad_request");
        }
        assert_eq!(holder(None).unwrap_err().http_status(), 400);
        assert_eq!(holder(Some(" ".into())).unwrap_err().http_status(), 400);
    }

    #[test]
    fn a_claim_lasts_at_least_its_ttl() {
        let name = ServiceName::parse("comfyui").unwrap();
        let before = UtcTime::of_ms(now_ms());
        let claim = claim(name, Some("me".into()), Some("30".into())).unwrap();
        assert!(claim.until >= before.plus_s(30), "{claim}");
        assert!(claim.until <= before.plus_s(32), "{claim}");
    }
}
