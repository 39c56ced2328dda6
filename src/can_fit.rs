//! `GET /gpu/can-fit?mb=N[&priority=P]` (the requirements' `can_fit(required_mb)`): would
//! N MB fit on the GPU now, and if not, what a start of that size would stop.
//!
//! A pure function of the published status snapshot: it asks the reconciler nothing and
//! changes nothing. It counts memory with the planner's rules (`plan::Budget` and
//! `plan::footprint_mb`: declared, learned peak, or observed, whichever is most) and preempts as the planner does: services of higher (or
//! equal) priority keep their room, then lower ones are kept, highest first, while they
//! still fit in what is left; the rest would be stopped. A claimed service is never
//! stopped, whatever its priority (docs/ARCHITECTURE.md, "Claims").

use serde::{Deserialize, Serialize};

use crate::plan::{footprint_mb, Budget, Presence, ServiceView};
use crate::status::{ClaimStatus, ServiceState, ServiceStatus, Status};

/// The answer, as the API sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanFit {
    /// N MB fit now without stopping anything.
    pub fits: bool,
    pub mb: u64,
    /// What is left of the budget after every service that holds memory.
    pub free_mb: u64,
    /// GPU total - reserve - external memory: what the services may share.
    pub budget_mb: u64,
    /// The priority asked about; None: above every service.
    pub priority: Option<i64>,
    /// What a start of N MB at `priority` would stop, in stop order (lowest priority
    /// first); empty when it fits, or when it cannot fit even by stopping them.
    pub would_preempt: Vec<String>,
    /// The claims on services that hold memory now: no start stops those.
    #[serde(default)]
    pub protected: Vec<ClaimStatus>,
    pub reason: String,
}

/// Reads `?mb=N[&priority=P]`; the error says what was wrong (the API answers it as 400).
pub fn parse_query(mb: Option<&str>, priority: Option<&str>) -> Result<(u64, Option<i64>), String> {
    let mb = match mb.map(str::parse::<u64>) {
        Some(Ok(mb)) if mb > 0 => mb,
        Some(_) => {
            return Err(format!(
                "mb {:?} is not a size: give a whole number of MB, 1 or more (?mb=4096)",
                mb.unwrap_or_default()
            ))
        }
        None => return Err("mb is missing: ask /gpu/can-fit?mb=N[&priority=P]".to_owned()),
    };
    let priority = priority
        .map(|text| {
            text.parse::<i64>().map_err(|_| {
                format!("priority {text:?} is not a whole number: give the priority the start would have, as in the config")
            })
        })
        .transpose()?;
    Ok((mb, priority))
}

/// A service that holds VRAM now, with what it counts for.
struct Holder<'a> {
    name: &'a str,
    priority: i64,
    mb: u64,
    claimed: bool,
}

/// Whether a service in this state holds (or is about to hold) VRAM.
fn holds_memory(service: &ServiceStatus) -> bool {
    matches!(
        service.state,
        ServiceState::Starting
            | ServiceState::Ready
            | ServiceState::Unhealthy
            | ServiceState::Stopping
            | ServiceState::Draining
            | ServiceState::Parked
    ) || service.observed_vram_mb.is_some()
}

/// Answers whether `mb` fits now, and what a start of that size at `priority` (None:
/// above every service) would stop.
pub fn can_fit(status: &Status, mb: u64, priority: Option<i64>) -> CanFit {
    let budget = Budget {
        total_mb: status.vram.total_mb,
        reserve_mb: status.vram.reserve_mb,
        external_mb: status.vram.external_mb,
    };
    let budget_mb = budget.usable_mb();
    let mut holders: Vec<Holder> = status
        .services
        .iter()
        .filter(|(_, service)| holds_memory(service))
        .map(|(name, service)| {
            let view = ServiceView {
                observed_mb: service.observed_vram_mb,
                learned_mb: service.learned_peak_mb,
                ..ServiceView::new(Presence::Running)
            };
            let mb = match service.state {
                // A parked service holds only its residual.
                ServiceState::Parked => service
                    .observed_vram_mb
                    .or(service.residual_mb)
                    .unwrap_or(0),
                _ => footprint_mb(service.declared_vram_mb, &view),
            };
            Holder {
                name,
                priority: service.priority,
                mb,
                claimed: !service.claims.is_empty(),
            }
        })
        .collect();
    // Highest priority first, as the planner walks the inventory.
    holders.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(b.name)));
    let held_mb: u64 = holders.iter().map(|h| h.mb).sum();
    let free_mb = budget_mb.saturating_sub(held_mb);
    let protected: Vec<ClaimStatus> = status
        .services
        .values()
        .filter(|service| holds_memory(service))
        .flat_map(|service| service.claims.iter().cloned())
        .collect();
    let answer = |fits, would_preempt, reason| CanFit {
        fits,
        mb,
        free_mb,
        budget_mb,
        priority,
        would_preempt,
        protected: protected.clone(),
        reason,
    };

    if mb <= free_mb {
        return answer(
            true,
            Vec::new(),
            format!("{mb} MB fit now: {free_mb} MB of the {budget_mb} MB budget are free"),
        );
    }
    let budget_text = format!(
        "{budget_mb} MB budget = {} MB total - {} MB reserve - {} MB external",
        budget.total_mb, budget.reserve_mb, budget.external_mb
    );
    if mb > budget_mb {
        return answer(
            false,
            Vec::new(),
            format!("{mb} MB can never fit: the {budget_text}"),
        );
    }

    let outranks =
        |holder: &Holder| !holder.claimed && priority.is_none_or(|p| p > holder.priority);
    let (lower, kept): (Vec<&Holder>, Vec<&Holder>) = holders.iter().partition(|h| outranks(h));
    let mut remaining = budget_mb.saturating_sub(kept.iter().map(|h| h.mb).sum());
    let at = priority.map_or("any priority".to_owned(), |p| format!("priority {p}"));
    if mb > remaining {
        let names: Vec<String> = kept
            .iter()
            .map(|h| match h.claimed {
                true => format!("{} {} MB (claimed)", h.name, h.mb),
                false => format!("{} {} MB (priority {})", h.name, h.mb, h.priority),
            })
            .collect();
        return answer(
            false,
            Vec::new(),
            format!(
                "{mb} MB do not fit at {at}: {free_mb} MB are free and stopping every lower-priority service leaves {remaining} MB; held by {} (the {budget_text})",
                names.join(", ")
            ),
        );
    }
    remaining -= mb;
    let mut would_preempt = Vec::new();
    for holder in lower {
        if holder.mb <= remaining {
            remaining -= holder.mb;
        } else {
            would_preempt.push(holder.name.to_owned());
        }
    }
    // The planner stops the lowest priority first.
    would_preempt.reverse();
    let reason = format!(
        "{mb} MB do not fit now ({free_mb} MB free); a start at {at} would stop {}",
        would_preempt.join(", ")
    );
    answer(false, would_preempt, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(
        state: ServiceState,
        declared: u64,
        observed: Option<u64>,
        priority: i64,
    ) -> ServiceStatus {
        ServiceStatus {
            state,
            priority,
            observed_vram_mb: observed,
            pids: Vec::new(),
            wanted: false,
            ..ServiceStatus::ready_for_test(declared, 0, Vec::new())
        }
    }

    /// The requirements' 24 GB GPU with a 1 GB desktop and 512 MB reserve: 23040 MB
    /// budget; `running` are (name, observed MB).
    fn rtx4090(running: &[(&str, Option<u64>)]) -> Status {
        let mut status = Status::default();
        status.vram.total_mb = 24576;
        status.vram.reserve_mb = 512;
        status.vram.external_mb = 1024;
        for (name, declared, priority) in [
            ("comfyui", 20480, 100),
            ("cosyvoice", 4096, 50),
            ("vidi", 4096, 40),
            ("ollama", 18432, 10),
        ] {
            let observed = running.iter().find(|(n, _)| *n == name).map(|(_, mb)| *mb);
            let state = match observed {
                Some(_) => ServiceState::Ready,
                None => ServiceState::Stopped,
            };
            let status_of = service(state, declared, observed.flatten(), priority);
            status.services.insert(name.into(), status_of);
        }
        status
    }

    #[test]
    fn fits_in_what_the_running_services_leave() {
        let status = rtx4090(&[("cosyvoice", Some(4096))]);
        let answer = can_fit(&status, 18944, None);
        assert!(answer.fits, "{answer:?}");
        assert_eq!(answer.budget_mb, 23040);
        assert_eq!(answer.free_mb, 18944);
        assert!(answer.would_preempt.is_empty());
        assert!(!can_fit(&status, 18945, Some(1000)).fits);
    }

    #[test]
    fn a_service_counts_for_more_than_declared_when_the_gpu_shows_more() {
        let status = rtx4090(&[("vidi", Some(6000))]);
        assert_eq!(can_fit(&status, 1, None).free_mb, 23040 - 6000);
    }

    #[test]
    fn a_running_service_counts_for_its_learned_peak() {
        // Vidi holds 4096 MB now but was seen to take 9000: it may grow back to it.
        let mut status = rtx4090(&[("vidi", Some(4096))]);
        status.services.get_mut("vidi").unwrap().learned_peak_mb = Some(9000);
        assert_eq!(can_fit(&status, 1, None).free_mb, 23040 - 9000);
        assert!(!can_fit(&status, 14041, None).fits);
    }

    #[test]
    fn would_preempt_follows_the_planner_lowest_priority_first() {
        // 20000 MB at priority 60 beside cosyvoice (4096, p50) and vidi (4096, p40):
        // 3040 MB would be left, so both must go.
        let status = rtx4090(&[("cosyvoice", None), ("vidi", None)]);
        let answer = can_fit(&status, 20000, Some(60));
        assert!(!answer.fits);
        assert_eq!(answer.would_preempt, ["vidi", "cosyvoice"]);
        assert!(
            answer.reason.contains("would stop vidi, cosyvoice"),
            "{}",
            answer.reason
        );

        // 16000 MB at priority 45 keeps cosyvoice (p50) and stops vidi (p40).
        let answer = can_fit(&status, 16000, Some(45));
        assert_eq!(answer.would_preempt, ["vidi"]);
    }

    #[test]
    fn higher_priorities_keep_their_room() {
        let status = rtx4090(&[("comfyui", None)]);
        let answer = can_fit(&status, 4096, Some(50));
        assert!(!answer.fits);
        assert!(answer.would_preempt.is_empty());
        assert!(
            answer.reason.contains("comfyui 20480 MB (priority 100)"),
            "{}",
            answer.reason
        );
        assert_eq!(can_fit(&status, 4096, Some(101)).would_preempt, ["comfyui"]);
    }

    #[test]
    fn a_claimed_service_is_never_preempted_and_its_claim_is_listed() {
        let mut status = rtx4090(&[("cosyvoice", None), ("vidi", None)]);
        let claim = ClaimStatus {
            service: "vidi".into(),
            holder: "tts-batch".into(),
            until: crate::utc::UtcTime::parse("2026-12-03T10:15:00Z").unwrap(),
            seconds_left: 60,
        };
        status.services.get_mut("vidi").unwrap().claims = vec![claim.clone()];
        // 16000 MB at priority 60 would stop vidi (p40) and keep cosyvoice were vidi not
        // claimed: vidi keeps its room, so cosyvoice goes instead.
        let answer = can_fit(&status, 16000, Some(60));
        assert_eq!(answer.would_preempt, ["cosyvoice"]);
        assert_eq!(answer.protected, [claim]);
        let answer = can_fit(&status, 20000, None);
        assert!(answer.would_preempt.is_empty(), "{answer:?}");
        assert!(
            answer.reason.contains("vidi 4096 MB (claimed)"),
            "{}",
            answer.reason
        );
    }

    #[test]
    fn bad_queries_say_what_is_wrong() {
        assert_eq!(parse_query(Some("4096"), Some("-5")), Ok((4096, Some(-5))));
        assert_eq!(parse_query(Some("1"), None), Ok((1, None)));
        for bad in ["abc", "0", "-1", "1.5", ""] {
            let error = parse_query(Some(bad), None).unwrap_err();
            assert!(error.contains("whole number of MB"), "{bad}: {error}");
        }
        assert!(parse_query(None, None)
            .unwrap_err()
            .contains("mb is missing"));
        assert!(parse_query(Some("1"), Some("high"))
            .unwrap_err()
            .contains("priority"));
    }

    #[test]
    fn more_than_the_budget_never_fits() {
        let answer = can_fit(&rtx4090(&[]), 23041, None);
        assert!(!answer.fits);
        assert!(answer.reason.contains("can never fit"), "{}", answer.reason);
        assert!(
            answer.reason.contains("1024 MB external"),
            "{}",
            answer.reason
        );
    }
}
