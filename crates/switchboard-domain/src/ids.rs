//! Identifiers. Tenants, groups and agents are named by the tenant's configuration (short slugs);
//! conversations get a time-ordered UUID (v7) so that ids sort roughly by creation.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a string was refused as an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("an identifier must not be empty")]
    Empty,
    #[error("an identifier is at most {max} characters long")]
    TooLong { max: usize },
    #[error("an identifier may contain only letters, digits, '-', '_' and '.'")]
    BadCharacter,
    #[error("not a conversation id (a UUID is expected)")]
    NotAUuid,
}

const MAX_SLUG_LEN: usize = 64;

fn check_slug(text: &str) -> Result<(), IdError> {
    if text.is_empty() {
        return Err(IdError::Empty);
    }
    if text.len() > MAX_SLUG_LEN {
        return Err(IdError::TooLong { max: MAX_SLUG_LEN });
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !text.chars().all(allowed) {
        return Err(IdError::BadCharacter);
    }
    Ok(())
}

macro_rules! slug_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(text: impl Into<String>) -> Result<Self, IdError> {
                let text = text.into();
                check_slug(&text)?;
                Ok(Self(text))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(text: String) -> Result<Self, IdError> {
                Self::new(text)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

slug_id!(
    /// A tenant: one company using Switchboard, with its own groups, agents and widget keys.
    TenantId
);
slug_id!(
    /// A support group (a queue) inside a tenant.
    GroupId
);
slug_id!(
    /// An agent inside a tenant.
    AgentId
);

/// A conversation (a chat session) between one customer and the agents who handle it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConversationId(Uuid);

impl ConversationId {
    /// A new time-ordered id. The caller passes the random and time parts through `Uuid` so that the domain
    /// reads no clock itself.
    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// A new time-ordered id (UUID v7) whose time part is `now_ms` from the caller's clock.
    pub fn new_v7(now_ms: i64) -> Self {
        let now_ms = u64::try_from(now_ms).unwrap_or(0);
        let nanos = ((now_ms % 1000) * 1_000_000) as u32;
        let timestamp = uuid::Timestamp::from_unix(uuid::NoContext, now_ms / 1000, nanos);
        Self(Uuid::new_v7(timestamp))
    }

    /// The id of the chat a customer of `tenant` starts with `start_key` (chosen by the client, once per
    /// chat): the same for the same two, so that a start sent again is answered with the chat the first one
    /// made, whichever gateway and router take it. A UUID v8 made of the first 16 bytes of a SHA-256 of
    /// both: whoever sees the id (agents do) learns nothing of the key, which is what lets a repeated start
    /// have the chat's customer token.
    pub fn for_start(tenant: &TenantId, start_key: Uuid) -> Self {
        let digest = start_key_digest(b"switchboard chat.start", tenant, start_key);
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        Self(Uuid::new_v8(bytes))
    }

    /// Whether the id was derived from a client's start key ([`ConversationId::for_start`]), so that a
    /// start for it may be sent again.
    pub fn is_from_start_key(&self) -> bool {
        self.0.get_version_num() == 8
    }

    pub fn parse(text: &str) -> Result<Self, IdError> {
        Uuid::parse_str(text).map(Self).map_err(|_| IdError::NotAUuid)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

/// A SHA-256 of `purpose`, the tenant and a client's start key: what a start key derives is one of these,
/// each for a purpose of its own, so that none gives another away.
pub(crate) fn start_key_digest(purpose: &[u8], tenant: &TenantId, start_key: Uuid) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(purpose);
    hash.update(b"\0");
    hash.update(tenant.as_str().as_bytes());
    hash.update(b"\0");
    hash.update(start_key.as_bytes());
    hash.finalize().into()
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_refuse_what_could_confuse_keys_or_logs() {
        assert_eq!(GroupId::new(""), Err(IdError::Empty));
        assert_eq!(GroupId::new("a/b"), Err(IdError::BadCharacter));
        assert_eq!(GroupId::new("sales desk"), Err(IdError::BadCharacter));
        assert_eq!(GroupId::new("x".repeat(65)), Err(IdError::TooLong { max: 64 }));
        assert_eq!(GroupId::new("sales-1.eu_west").unwrap().as_str(), "sales-1.eu_west");
    }

    #[test]
    fn a_start_key_gives_one_id_per_tenant_and_key() {
        let key = Uuid::parse_str("2f1e0c9a-6b7d-4e53-9a1c-0d8e7f6a5b4c").unwrap();
        let other_key = Uuid::parse_str("2f1e0c9a-6b7d-4e53-9a1c-0d8e7f6a5b4d").unwrap();
        let acme = TenantId::new("acme").unwrap();
        let globex = TenantId::new("globex").unwrap();
        let id = ConversationId::for_start(&acme, key);
        assert_eq!(id, ConversationId::for_start(&acme, key), "the same start gives the same chat");
        assert_ne!(id, ConversationId::for_start(&acme, other_key));
        assert_ne!(id, ConversationId::for_start(&globex, key), "tenants never share a chat");
        assert!(id.is_from_start_key());
        assert!(!ConversationId::new_v7(1_767_225_600_000).is_from_start_key());
        assert_ne!(id.as_uuid().as_bytes()[..6], key.as_bytes()[..6], "the key is not in the id");
        assert_eq!(ConversationId::parse(&id.to_string()), Ok(id), "an ordinary conversation id");
        // The derivation never changes: a start sent again after an upgrade must find its chat. (Computed
        // apart: the first 16 bytes of SHA-256("switchboard chat.start\0acme\0" + key), as a UUID v8.)
        assert_eq!(id.to_string(), "616ba33d-e4a5-8ae3-b46e-7ff707c2832f");
    }

    #[test]
    fn ids_deserialize_through_validation() {
        let bad: Result<AgentId, _> = serde_json::from_str("\"a b\"");
        assert!(bad.is_err());
        assert!(ConversationId::parse("not-a-uuid").is_err());
    }
}
