//! Who is calling: API keys, the tenant each belongs to and the scopes it carries
//! (`docs/security.md`).
//!
//! A key is `tfk_` and 43 characters of base64url: 256 random bits. Only its SHA-256 is stored,
//! and a key is looked up by that hash, so no secret is ever compared. What a lookup finds is
//! kept for [`CACHE_TTL`] at most, so a revocation takes effect on every scheduler within it.

use std::fmt;
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::HeaderValue;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use ring::rand::SecureRandom as _;
use taskfleet_common::names::is_valid_name;
use uuid::Uuid;

use crate::api::{ApiError, AppState};
use crate::store::{self, KeyRow};
use crate::ttl_cache::TtlCache;

/// How long what a key lookup found is trusted: a revoked key stops working within this.
pub const CACHE_TTL: Duration = Duration::from_secs(1);
/// The most keys (found or not) remembered at once; past it, the cache starts afresh.
const CACHE_CAPACITY: usize = 10_000;
/// The prefix of every key, so that a leaked one is easy to recognise (and to search for).
const KEY_PREFIX: &str = "tfk_";
/// The random bytes of a key's secret.
const KEY_BYTES: usize = 32;
/// The longest `Authorization` value read; a key is far shorter.
const MAX_CREDENTIALS_LEN: usize = 256;
/// The tenant of everything made with authentication off, or before keys existed.
pub const DEFAULT_TENANT: &str = "default";

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, utoipa::ToSchema)]
pub enum Scope {
    /// Read runs, jobs, workflows and the tenant's counts.
    #[serde(rename = "runs:read")]
    RunsRead,
    /// Submit runs and jobs, and cancel them.
    #[serde(rename = "runs:write")]
    RunsWrite,
    /// Register workflows.
    #[serde(rename = "workflows:write")]
    WorkflowsWrite,
    /// Submit definitions with `python_code` steps: arbitrary code on every worker.
    #[serde(rename = "python_code")]
    PythonCode,
    /// Everything: keys, quotas, the audit trail, and the fleet's views of every tenant.
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    /// Every scope, in the order the docs list them.
    pub const ALL: [Self; 5] = [
        Self::RunsRead,
        Self::RunsWrite,
        Self::WorkflowsWrite,
        Self::PythonCode,
        Self::Admin,
    ];

    /// Returns the scope's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RunsRead => "runs:read",
            Self::RunsWrite => "runs:write",
            Self::WorkflowsWrite => "workflows:write",
            Self::PythonCode => "python_code",
            Self::Admin => "admin",
        }
    }

    /// Returns the scope of a name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|scope| scope.as_str() == name)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Returns scopes parsed from their names, or a message naming the first unknown one (or
/// saying that there are none).
pub fn parse_scopes<S: AsRef<str>>(names: &[S]) -> Result<Vec<Scope>, String> {
    let known = || {
        Scope::ALL
            .iter()
            .map(|scope| scope.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if names.is_empty() {
        return Err(format!("scopes must name at least one of {}", known()));
    }
    let mut scopes = Vec::new();
    for name in names {
        let name = name.as_ref();
        let scope = Scope::parse(name)
            .ok_or_else(|| format!("scope {name:?} is not one of {}", known()))?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    Ok(scopes)
}

/// Checks a tenant's name: the rules of every name (`docs/api.md`).
pub fn check_tenant(tenant: &str) -> Result<(), String> {
    if is_valid_name(tenant) {
        Ok(())
    } else {
        Err(format!(
            "tenant {tenant:?} must be 1 to 64 characters among A-Z a-z 0-9 _ - ."
        ))
    }
}

/// The caller of a request: its key (none with authentication off), tenant and scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's id.
    pub key_id: Option<Uuid>,
    /// The tenant whose objects the caller reaches.
    pub tenant: String,
    scopes: Vec<Scope>,
}

impl Principal {
    /// The caller of every request with authentication off: the default tenant, every scope.
    pub fn unauthenticated() -> Self {
        Self {
            key_id: None,
            tenant: DEFAULT_TENANT.to_owned(),
            scopes: vec![Scope::Admin],
        }
    }

    /// Returns whether the caller has `scope` (`admin` has them all).
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }

    /// Returns the 403 naming `scope` unless the caller has it.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.has(scope) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this API key lacks the scope {scope}"
            )))
        }
    }

    /// Returns the caller a stored key stands for, or `None` for a revoked key or one whose
    /// scopes this version does not know.
    fn of_key(row: &KeyRow) -> Option<Self> {
        if row.revoked_at.is_some() {
            return None;
        }
        Some(Self {
            key_id: Some(row.id),
            tenant: row.tenant.clone(),
            scopes: parse_scopes(&row.scopes).ok()?,
        })
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        parts.extensions.get::<Self>().cloned().ok_or_else(|| {
            ApiError::internal(&"a handler that needs a caller is outside the authentication layer")
        })
    }
}

/// A new key: its id, and the secret shown once.
#[derive(Debug)]
pub struct NewSecret {
    /// The key's id.
    pub id: Uuid,
    /// The key itself, `tfk_…`.
    pub secret: String,
    /// Its SHA-256, which is what is stored.
    pub hash: Vec<u8>,
}

/// Returns a new random key.
pub fn new_secret() -> Result<NewSecret, ApiError> {
    let mut bytes = [0_u8; KEY_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ApiError::internal(&"the system's random number generator failed"))?;
    let secret = format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = hash(&secret);
    Ok(NewSecret {
        id: Uuid::now_v7(),
        secret,
        hash,
    })
}

/// Returns the SHA-256 of a key.
fn hash(secret: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes())
        .as_ref()
        .to_vec()
}

/// Makes a key and stores it; returns its id and secret.
pub async fn create_key(
    db: &sqlx::PgPool,
    namespace: &str,
    tenant: &str,
    scopes: &[Scope],
    description: Option<&str>,
    created_by: Option<Uuid>,
) -> Result<NewSecret, ApiError> {
    let secret = new_secret()?;
    let scopes: Vec<String> = scopes
        .iter()
        .map(|scope| scope.as_str().to_owned())
        .collect();
    store::insert_key(
        db,
        namespace,
        &store::NewKey {
            id: secret.id,
            secret_hash: &secret.hash,
            tenant,
            scopes: &scopes,
            description,
            created_by,
        },
    )
    .await?;
    Ok(secret)
}

/// Whether requests need a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Every `/v1` request needs a valid key.
    Required,
    /// No request needs one (local development only: the API then listens on loopback only).
    Off,
}

/// Resolves the keys of requests, remembering what it found for [`CACHE_TTL`].
#[derive(Clone)]
pub struct Authenticator {
    mode: AuthMode,
    /// What key lookups found, by the key's hash (`None`: no valid key).
    cache: TtlCache<Vec<u8>, Option<Principal>>,
}

impl Authenticator {
    /// Returns an authenticator in `mode`.
    pub fn new(mode: AuthMode) -> Self {
        Self {
            mode,
            cache: TtlCache::new(CACHE_TTL, CACHE_CAPACITY),
        }
    }

    /// Returns the caller of a request with this `Authorization` header.
    async fn authenticate(
        &self,
        state: &AppState,
        header: Option<&HeaderValue>,
    ) -> Result<Principal, ApiError> {
        if self.mode == AuthMode::Off {
            return Ok(Principal::unauthenticated());
        }
        let secret = bearer(header)?;
        if !well_formed(secret) {
            return Err(ApiError::unauthorized());
        }
        let hash = hash(secret);
        let principal = match self.cache.get(&hash) {
            Some(principal) => principal,
            None => {
                let read_at = Instant::now();
                let row =
                    store::find_key(&state.db, state.config.namespace.as_str(), &hash).await?;
                let principal = row.as_ref().and_then(Principal::of_key);
                if let (Some(row), Some(_)) = (&row, &principal) {
                    let db = state.db.clone();
                    let id = row.id;
                    tokio::spawn(async move {
                        if let Err(error) = store::touch_key(&db, id).await {
                            tracing::debug!(%error, key_id = %id, "recording a key's last use");
                        }
                    });
                }
                self.cache.insert(hash, principal.clone(), read_at);
                principal
            }
        };
        principal.ok_or_else(ApiError::unauthorized)
    }
}

/// Returns the key of an `Authorization: Bearer <key>` header, or the 401 saying what is wrong.
fn bearer(header: Option<&HeaderValue>) -> Result<&str, ApiError> {
    let Some(header) = header else {
        return Err(ApiError::unauthorized());
    };
    if header.len() > MAX_CREDENTIALS_LEN {
        return Err(ApiError::malformed_credentials(format!(
            "the Authorization header is longer than {MAX_CREDENTIALS_LEN} bytes; an API key is far shorter"
        )));
    }
    let text = header.to_str().map_err(|_| {
        ApiError::malformed_credentials("the Authorization header must be ASCII: `Bearer <key>`")
    })?;
    let (scheme, key) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::malformed_credentials(
            "the Authorization header must be `Bearer <key>`",
        ));
    }
    let key = key.trim();
    if key.is_empty() {
        return Err(ApiError::malformed_credentials(
            "the Authorization header has no key after `Bearer`",
        ));
    }
    Ok(key)
}

/// Whether `key` has the form of a key this scheduler makes: `tfk_` and 43 base64url
/// characters. Anything else is refused without a lookup.
fn well_formed(key: &str) -> bool {
    key.strip_prefix(KEY_PREFIX).is_some_and(|secret| {
        secret.len() == 43
            && secret
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
    })
}

/// The middleware of every `/v1` route: finds the caller, or answers 401.
pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let header = request.headers().get(axum::http::header::AUTHORIZATION);
    match state.authenticator.authenticate(&state, header).await {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(error) => error.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_by_name_and_unknown_ones_are_named() {
        assert_eq!(
            parse_scopes(&["runs:read", "admin", "runs:read"]),
            Ok(vec![Scope::RunsRead, Scope::Admin])
        );
        let error = parse_scopes(&["runs:read", "root"]).expect_err("root is no scope");
        assert!(error.contains("\"root\""), "{error}");
        assert!(parse_scopes::<&str>(&[]).is_err());
    }

    #[test]
    fn admin_has_every_scope() {
        let admin = Principal::unauthenticated();
        assert!(Scope::ALL.iter().all(|scope| admin.has(*scope)));
        let reader = Principal {
            key_id: None,
            tenant: "t".to_owned(),
            scopes: vec![Scope::RunsRead],
        };
        assert!(reader.has(Scope::RunsRead));
        assert!(!reader.has(Scope::PythonCode));
        assert!(reader.require(Scope::RunsWrite).is_err());
    }

    #[test]
    fn keys_are_long_random_and_stored_as_their_hash() {
        let first = new_secret().expect("random bytes");
        let second = new_secret().expect("random bytes");
        assert_ne!(first.secret, second.secret);
        assert!(first.secret.starts_with("tfk_"));
        assert_eq!(first.secret.len(), 4 + 43);
        assert_eq!(first.hash.len(), 32);
        assert_eq!(first.hash, hash(&first.secret));
    }

    #[test]
    fn only_keys_of_the_right_form_are_looked_up() {
        let key = new_secret().expect("random bytes").secret;
        assert!(well_formed(&key));
        assert!(!well_formed("tfk_short"));
        assert!(!well_formed(&key.replace("tfk_", "xyz_")));
        assert!(!well_formed(&format!("{key}x")));
        assert!(!well_formed(&format!("tfk_{}", "+".repeat(43))));
    }

    fn check_bearer(header: &[u8], expected: Option<&str>) {
        let value = HeaderValue::from_bytes(header).expect("a header value");
        assert_eq!(bearer(Some(&value)).ok(), expected, "{header:?}");
    }

    #[test]
    fn only_bearer_credentials_are_read() {
        check_bearer(b"Bearer tfk_abc", Some("tfk_abc"));
        check_bearer(b"bearer   tfk_abc ", Some("tfk_abc"));
        check_bearer(b"Bearer", None);
        check_bearer(b"Bearer ", None);
        check_bearer(b"Basic dXNlcjpwYXNz", None);
        check_bearer(b"tfk_abc", None);
        check_bearer("Bearer t\u{e9}".as_bytes(), None);
        check_bearer(format!("Bearer {}", "a".repeat(10_000)).as_bytes(), None);
        assert!(bearer(None).is_err());
    }
}
