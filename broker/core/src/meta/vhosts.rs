//! Virtual hosts: separate namespaces of queues and exchanges, as AMQP's vhosts are.
//!
//! The metadata keeps one flat namespace; a name in a vhost other than the default `/`
//! is stored as `vhost` + U+001F + `name`. Neither part may hold a control character
//! (names are validated), so no name of one vhost can spell one of another, and the
//! default vhost's names are stored as they are.

use std::borrow::Cow;
use std::fmt;

/// The vhost every cluster has, and where names without one live.
pub const DEFAULT_VHOST: &str = "/";

/// Separates a vhost from a name in a stored name.
const SEPARATOR: char = '\u{1f}';

/// The stored name of `name` in `vhost`; `None` if `name` holds the separator (it could
/// name something in another vhost).
pub fn scoped<'a>(vhost: &str, name: &'a str) -> Option<Cow<'a, str>> {
    if name.contains(SEPARATOR) {
        return None;
    }
    Some(if vhost == DEFAULT_VHOST {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(format!("{vhost}{SEPARATOR}{name}"))
    })
}

/// The vhost and the name a stored name stands for.
pub fn unscoped(stored: &str) -> (&str, &str) {
    stored
        .split_once(SEPARATOR)
        .unwrap_or((DEFAULT_VHOST, stored))
}

/// Whether a stored name lies in `vhost`.
pub fn in_vhost(stored: &str, vhost: &str) -> bool {
    unscoped(stored).0 == vhost
}

/// A stored name as messages show it: `'name' in vhost 'v'`, RabbitMQ's words.
pub struct Named<'a>(pub &'a str);

impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (vhost, name) = unscoped(self.0);
        write!(f, "'{name}' in vhost '{vhost}'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_the_default_vhost_are_stored_as_they_are() {
        assert_eq!(scoped("/", "orders").as_deref(), Some("orders"));
        assert_eq!(unscoped("orders"), ("/", "orders"));
    }

    #[test]
    fn names_of_other_vhosts_round_trip_and_show_their_vhost() {
        let stored = scoped("shop", "orders").expect("a plain name");
        assert_ne!(stored, "orders");
        assert_eq!(unscoped(&stored), ("shop", "orders"));
        assert!(in_vhost(&stored, "shop") && !in_vhost(&stored, "/"));
        assert_eq!(Named(&stored).to_string(), "'orders' in vhost 'shop'");
    }

    #[test]
    fn a_name_holding_the_separator_reaches_no_other_vhost() {
        let other = scoped("shop", "orders").expect("a plain name");
        assert_eq!(scoped("/", &other), None);
    }
}
