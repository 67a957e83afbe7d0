//! Records of the replicated state: domains, repositories, principals, token keys.
//! Package and version records are `granary_format::model`'s, shared with the formats.

use serde::{Deserialize, Serialize};

/// A resource tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    /// Key, 1–128 characters.
    pub key: String,
    /// Value, 0–256 characters.
    pub value: String,
}

/// A domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainRecord {
    /// Domain name, unique in the cluster.
    pub name: String,
    /// Owning account (12 digits).
    pub owner: String,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
    /// The encryption key ARN reported by the API.
    pub encryption_key: String,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<Tag>,
}

/// A repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryRecord {
    /// Domain name.
    pub domain: String,
    /// Repository name.
    pub name: String,
    /// The administrator account.
    pub administrator: String,
    /// Free text, ≤1000 characters.
    #[serde(default)]
    pub description: Option<String>,
    /// Upstream repositories in priority order.
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// External connection names (`public:npmjs`, …).
    #[serde(default)]
    pub external_connections: Vec<String>,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<Tag>,
}

/// A principal with its SigV4 access key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// The account (12 digits).
    pub account: String,
    /// The principal's name (`admin`).
    pub name: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
}

impl Principal {
    /// The principal's ARN.
    pub fn arn(&self) -> String {
        format!("arn:aws:iam::{}:user/{}", self.account, self.name)
    }
}

/// A key that signs repository authorization tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenKey {
    /// Key id, carried in each token.
    pub kid: String,
    /// The key, hex.
    pub key_hex: String,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
}
