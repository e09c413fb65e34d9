//! Users who may connect, and the vhosts each may open, as RabbitMQ's internal users
//! are. Passwords are kept only as PBKDF2-HMAC-SHA256 hashes with a salt of their own,
//! made on the node that takes the request (the metadata's state machine stays
//! deterministic). The built-in `guest`/`guest` may connect from loopback only and open
//! every vhost; a stored user named `guest` replaces its password.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::num::NonZeroU32;

use ring::rand::SecureRandom as _;
use serde::{Deserialize, Serialize};

/// The user every fresh cluster has (loopback only).
pub const GUEST: &str = "guest";

/// PBKDF2 rounds: each login (and each guess against a stolen hash) costs this many
/// HMAC-SHA256 computations; the check runs off the async threads.
const ROUNDS: u32 = 10_000;
const SALT_BYTES: usize = 16;
const HASH_BYTES: usize = 32;
const SCHEME: &str = "pbkdf2-sha256";

/// A user as the metadata keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// `pbkdf2-sha256$<rounds>$<salt hex>$<hash hex>`.
    pub password_hash: String,
    /// Free-form tags (RabbitMQ's `administrator`, `monitoring`, …), shown, not enforced.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The vhosts the user may open.
    #[serde(default)]
    pub vhosts: BTreeSet<String>,
}

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
#[error("the system random source failed")]
pub struct HashError;

/// `password` hashed with a fresh salt, as [`User::password_hash`] keeps it.
pub fn hash_password(password: &str) -> Result<String, HashError> {
    let mut salt = [0u8; SALT_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| HashError)?;
    Ok(format!(
        "{SCHEME}${ROUNDS}${}${}",
        hex(&salt),
        hex(&derive(ROUNDS, &salt, password))
    ))
}

/// Whether `password` is the one `stored` was hashed from.
pub fn verify_password(stored: &str, password: &[u8]) -> bool {
    let mut parts = stored.split('$');
    let (Some(SCHEME), Some(rounds), Some(salt), Some(hash), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let (Some(rounds), Some(salt), Some(hash)) = (
        rounds.parse().ok().and_then(NonZeroU32::new),
        unhex(salt),
        unhex(hash),
    ) else {
        return false;
    };
    ring::pbkdf2::verify(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        rounds,
        &salt,
        password,
        &hash,
    )
    .is_ok()
}

fn derive(rounds: u32, salt: &[u8], password: &str) -> [u8; HASH_BYTES] {
    let mut out = [0u8; HASH_BYTES];
    let rounds = NonZeroU32::new(rounds).unwrap_or(NonZeroU32::MIN);
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        rounds,
        salt,
        password.as_bytes(),
        &mut out,
    );
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hashed_password_verifies_and_no_other_does() {
        let stored = hash_password("s3cret").expect("random source");
        assert!(stored.starts_with("pbkdf2-sha256$10000$"));
        assert!(!stored.contains("s3cret"));
        assert!(verify_password(&stored, b"s3cret"));
        assert!(!verify_password(&stored, b"s3cret "));
        // A fresh salt each time: the same password hashes differently.
        assert_ne!(stored, hash_password("s3cret").expect("random source"));
    }

    #[test]
    fn a_damaged_hash_verifies_nothing() {
        let stored = hash_password("pw").expect("random source");
        for damaged in [
            String::new(),
            stored.replacen("pbkdf2-sha256", "md5", 1),
            stored.replacen("$10000$", "$0$", 1),
            format!("{stored}$more"),
            stored[..stored.len() - 1].to_owned(),
        ] {
            assert!(!verify_password(&damaged, b"pw"), "{damaged}");
        }
    }
}
