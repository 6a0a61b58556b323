//! The customer token: the secret a customer resumes their chat with. The gateway chooses it (random, or
//! derived from the client's start key so that a start sent again answers the same one); the store keeps
//! only its SHA-256, so that a copy of the database does not let anyone into a customer's chat.

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::TenantId;
use crate::ids::start_key_digest;

/// The prefix of a stored token's hash. A stored value without it is a token stored before tokens were
/// hashed, kept as it was.
const HASHED: &str = "sha256:";

/// A new random token (a chat started without a start key).
pub fn new_customer_token() -> String {
    Uuid::new_v4().simple().to_string()
}

/// The token of the chat a customer of `tenant` starts with `start_key`: the same for the same two (see
/// [`ConversationId::for_start`](crate::ConversationId::for_start), whose hash it does not share), 32 hex
/// digits like a random one. Whoever knows the key knows the token, as the protocol says.
pub fn customer_token_for_start(tenant: &TenantId, start_key: Uuid) -> String {
    hex(&start_key_digest(b"switchboard customer token", tenant, start_key)[..16])
}

/// What the store keeps of `token`.
pub fn stored_customer_token(token: &str) -> String {
    format!("{HASHED}{}", hex(&Sha256::digest(token.as_bytes())))
}

/// Whether `given` is the token of which `stored` is what the store keeps, in time independent of where
/// they differ.
pub fn customer_token_matches(stored: &str, given: &str) -> bool {
    match stored.strip_prefix(HASHED) {
        Some(_) => constant_time_eq(stored.as_bytes(), stored_customer_token(given).as_bytes()),
        None => !stored.is_empty() && constant_time_eq(stored.as_bytes(), given.as_bytes()),
    }
}

/// The token itself when `stored` is one kept from before tokens were hashed.
pub fn unhashed_customer_token(stored: &str) -> Option<&str> {
    (!stored.starts_with(HASHED) && !stored.is_empty()).then_some(stored)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut text, byte| {
        let _ = write!(text, "{byte:02x}");
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConversationId;

    #[test]
    fn the_store_keeps_a_hash_that_only_the_token_matches() {
        let token = new_customer_token();
        let stored = stored_customer_token(&token);
        assert!(stored.starts_with("sha256:") && !stored.contains(&token), "{stored}");
        assert_eq!(stored.len(), "sha256:".len() + 64);
        assert!(customer_token_matches(&stored, &token));
        assert!(!customer_token_matches(&stored, &new_customer_token()));
        assert!(!customer_token_matches(&stored, ""));
        assert!(!customer_token_matches(&stored, &stored), "the hash is not a token");
        assert_eq!(unhashed_customer_token(&stored), None);
    }

    #[test]
    fn a_token_stored_before_hashing_still_matches_itself() {
        let legacy = "3f2c9a0d6b7e4f1a8c5d2e9b0a1f3c4d";
        assert!(customer_token_matches(legacy, legacy));
        assert!(!customer_token_matches(legacy, "3f2c9a0d6b7e4f1a8c5d2e9b0a1f3c4e"));
        assert_eq!(unhashed_customer_token(legacy), Some(legacy));
        // No token at all matches nothing.
        assert!(!customer_token_matches("", ""));
        assert_eq!(unhashed_customer_token(""), None);
    }

    #[test]
    fn a_start_key_gives_one_token_per_tenant_and_key_unrelated_to_the_chat_id() {
        let key = Uuid::parse_str("2f1e0c9a-6b7d-4e53-9a1c-0d8e7f6a5b4c").unwrap();
        let other = Uuid::parse_str("2f1e0c9a-6b7d-4e53-9a1c-0d8e7f6a5b4d").unwrap();
        let (acme, globex) = (TenantId::new("acme").unwrap(), TenantId::new("globex").unwrap());
        let token = customer_token_for_start(&acme, key);
        assert_eq!(token, customer_token_for_start(&acme, key));
        assert_ne!(token, customer_token_for_start(&acme, other));
        assert_ne!(token, customer_token_for_start(&globex, key));
        assert_eq!(token.len(), 32);
        // Never changes either (computed apart: SHA-256("switchboard customer token\0acme\0" + key), hex).
        assert_eq!(token, "81ae17b93a24ac15653d46a14fe9d8e1");
        assert!(token.bytes().all(|byte| byte.is_ascii_hexdigit()));
        // The chat's id, which agents see, does not give the token away.
        let id = ConversationId::for_start(&acme, key).as_uuid().simple().to_string();
        assert_ne!(id, token);
        assert_ne!(id[..8], token[..8]);
    }
}
