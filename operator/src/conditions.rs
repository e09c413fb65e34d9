//! Standard status conditions (`Ready`, `Progressing`, `Degraded`), each keeping the
//! time it last changed status, as `kubectl wait --for=condition=Ready` reads them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// The resource does what it asks for.
pub const READY: &str = "Ready";
/// The operator is changing something (creating, scaling, rolling).
pub const PROGRESSING: &str = "Progressing";
/// Something asked for is not served, or failed.
pub const DEGRADED: &str = "Degraded";

/// One condition as the operator sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Its type, such as [`READY`].
    pub type_: &'static str,
    /// Whether it holds.
    pub status: bool,
    /// PascalCase, for machines.
    pub reason: String,
    /// For people.
    pub message: String,
}

impl Observed {
    /// A condition that holds.
    pub fn yes(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Observed {
            type_,
            status: true,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }

    /// A condition that does not hold.
    pub fn no(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Observed {
            status: false,
            ..Observed::yes(type_, reason, message)
        }
    }
}

/// The conditions to store: `observed` for `generation`, each keeping its previous
/// transition time in `current` unless its status changed.
pub fn merge(
    current: &[Condition],
    observed: &[Observed],
    generation: Option<i64>,
) -> Vec<Condition> {
    observed
        .iter()
        .map(|o| {
            let status = if o.status { "True" } else { "False" };
            let since = current
                .iter()
                .find(|c| c.type_ == o.type_ && c.status == status)
                .map_or_else(
                    || Time(Timestamp::now()),
                    |c| c.last_transition_time.clone(),
                );
            Condition {
                type_: o.type_.to_owned(),
                status: status.to_owned(),
                reason: o.reason.clone(),
                message: o.message.clone(),
                last_transition_time: since,
                observed_generation: generation,
            }
        })
        .collect()
}

/// Whether `conditions` say `type_` holds.
pub fn holds(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let first = merge(&[], &[Observed::no(READY, "Creating", "creating")], Some(1));
        let again = merge(&first, &[Observed::no(READY, "Creating", "still")], Some(2));
        assert_eq!(again[0].last_transition_time, first[0].last_transition_time);
        assert_eq!(again[0].message, "still");
        assert_eq!(again[0].observed_generation, Some(2));
        let flipped = merge(&again, &[Observed::yes(READY, "Created", "done")], Some(2));
        assert_eq!(flipped[0].status, "True");
        assert!(holds(&flipped, READY));
        assert!(!holds(&again, READY));
    }
}
