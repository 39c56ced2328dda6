//! Services whose backend cannot be reached (docs/ARCHITECTURE.md, "Unknown
//! services"). A docker service whose engine does not answer is `unknown`: its starts
//! are held back (its gate says why) and it is asked about again every round, while
//! native services carry on.

use crate::config::{ServiceName, ServiceSpec};
use crate::lease::LeaseBackend;
use crate::status::ServiceState;

use super::records::Event;

use super::effects::ServiceEffects;
use super::Reconciler;

impl<E: ServiceEffects, L: LeaseBackend> Reconciler<E, L> {
    /// Asks the service's backend whether it runs. When the backend cannot be asked,
    /// the service becomes `unknown`, with the error that names the engine tried.
    pub(super) async fn find_running(&mut self, spec: &ServiceSpec) -> Option<E::Instance> {
        let found = self.effects.find_running(spec).await;
        let record = self.records.get_mut(&spec.name)?;
        match found {
            Ok(found) => {
                record.apply(Event::BackendAnswered);
                found
            }
            Err(error) => {
                record.apply(Event::LookupFailed(error));
                None
            }
        }
    }

    /// Asks again about the services whose backend could not be reached: once it
    /// answers, a running container is adopted and a stopped one can be planned again.
    /// While the first one asked about stays unknown, the others are left for the next
    /// round: they would wait on the same engine, and a hung engine must not hold up
    /// the round.
    pub(super) async fn recheck_unknown(&mut self) {
        let unknown: Vec<ServiceName> = self
            .records
            .iter()
            .filter(|r| {
                r.state() == ServiceState::Unknown
                    && r.instance().is_none()
                    && r.in_flight().is_none()
            })
            .map(|r| r.name().clone())
            .collect();
        for name in unknown {
            self.adopt_each(std::slice::from_ref(&name)).await;
            if self
                .records
                .get(&name)
                .is_some_and(|r| r.state() == ServiceState::Unknown)
            {
                break;
            }
        }
    }
}
