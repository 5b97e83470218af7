//! Bearer tokens: verification of signed JWTs and minting of development tokens.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation, decode, decode_header, encode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::SecurityError;

/// Signature algorithms a key may be used with. One key, one algorithm: a key is never
/// tried under another algorithm than its own, which rules out algorithm confusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Algorithm {
    /// HMAC with SHA-256 over a shared secret of at least 32 bytes.
    HS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
}

impl Algorithm {
    fn jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            Algorithm::HS256 => jsonwebtoken::Algorithm::HS256,
            Algorithm::RS256 => jsonwebtoken::Algorithm::RS256,
        }
    }
}

/// One key, as configured.
#[derive(Clone)]
pub struct KeyMaterial {
    /// The key id tokens name in their `kid` header, if any.
    pub kid: Option<String>,
    /// The algorithm.
    pub algorithm: Algorithm,
    /// HS256: the shared secret. RS256: the public key, PEM.
    pub verify: Vec<u8>,
    /// HS256: the shared secret. RS256: the private key, PEM, when this host may mint tokens.
    pub sign: Option<Vec<u8>>,
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// Who must have issued a token and for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSettings {
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud`.
    pub audience: String,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds; at most [`MAX_LEEWAY_SECONDS`].
    pub leeway_seconds: u64,
    /// Longest token accepted, in bytes; a longer one is refused before it is decoded.
    pub max_token_bytes: usize,
}

/// The largest clock skew a verifier tolerates: beyond ten minutes, `exp` stops meaning much.
pub const MAX_LEEWAY_SECONDS: u64 = 600;

/// The default of [`TokenSettings::max_token_bytes`]: room for many roles, far from the
/// sizes that would let a client fill memory with tokens.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8192;

/// The verified identity behind a request. Shared strings: a token served from the
/// verified-token cache, and the call context made from it, copy none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `sub`.
    pub subject: Arc<str>,
    /// `tenant_id`: the only source of the tenant.
    pub tenant: Arc<str>,
    /// `roles`.
    pub roles: Arc<[String]>,
    /// `company_id`: the company the caller acts for, when the token names one (business
    /// providers such as purchase orders tell buyer and seller apart by it).
    pub company_id: Option<Arc<str>>,
}

// The registered claims are options so that a missing one is reported by the validation
// (naming it) rather than as a shapeless decoding error.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: Option<String>,
    tenant_id: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    company_id: Option<String>,
    iss: Option<String>,
    aud: Option<Audience>,
    exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    iat: Option<u64>,
}

/// `aud` may be one string or an array of them (RFC 7519 §4.1.3).
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

struct VerifyKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
    // Built once: it holds the issuer and audience sets, which would otherwise be allocated per request.
    validation: Validation,
}

/// Verifies bearer tokens against the configured keys.
pub struct TokenVerifier {
    keys: Vec<VerifyKey>,
    leeway_seconds: u64,
    max_token_bytes: usize,
    cache_capacity: usize,
    /// Tokens already verified, by SHA-256 of the token, with their identity and expiry. The
    /// same bytes verify the same way until they expire, so a client reusing its token skips
    /// the signature check and JSON decoding. Keyed by digest, the cache holds 32 bytes per
    /// token however long the token is.
    verified: RwLock<HashMap<[u8; 32], (Identity, u64)>>,
}

/// Entries kept in the verified-token cache, unless set otherwise.
const CACHE_CAPACITY: usize = 4096;

fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

const MIN_HMAC_SECRET: usize = 32;

fn key_name(k: &KeyMaterial, index: usize) -> String {
    match &k.kid {
        Some(kid) => format!("'{kid}'"),
        None => format!("#{}", index + 1),
    }
}

impl TokenVerifier {
    /// A verifier for `keys`; refuses short HMAC secrets, unparsable PEM and a leeway over
    /// [`MAX_LEEWAY_SECONDS`].
    pub fn new(keys: &[KeyMaterial], settings: TokenSettings) -> Result<Self, SecurityError> {
        if settings.leeway_seconds > MAX_LEEWAY_SECONDS {
            return Err(SecurityError::BadSetting {
                setting: "security.leeway_seconds",
                reason: format!(
                    "{} is out of range (at most {MAX_LEEWAY_SECONDS})",
                    settings.leeway_seconds
                ),
            });
        }
        if keys.is_empty() {
            return Err(SecurityError::BadKey {
                key: "(none)".into(),
                reason: "at least one key is needed to verify tokens".into(),
            });
        }
        let keys = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let bad = |reason: String| SecurityError::BadKey {
                    key: key_name(k, i),
                    reason,
                };
                let key = match k.algorithm {
                    Algorithm::HS256 => {
                        if k.verify.len() < MIN_HMAC_SECRET {
                            return Err(bad(format!(
                                "HS256 secret is {} bytes; at least {MIN_HMAC_SECRET} are required",
                                k.verify.len()
                            )));
                        }
                        DecodingKey::from_secret(&k.verify)
                    }
                    Algorithm::RS256 => DecodingKey::from_rsa_pem(&k.verify)
                        .map_err(|e| bad(format!("RS256 public key is not a usable PEM: {e}")))?,
                };
                let mut validation = Validation::new(k.algorithm.jwt());
                validation.set_issuer(&[&settings.issuer]);
                validation.set_audience(&[&settings.audience]);
                validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
                // Times are checked by `check_times`, against one clock that tests can set.
                validation.validate_exp = false;
                validation.validate_nbf = false;
                Ok(VerifyKey {
                    kid: k.kid.clone(),
                    algorithm: k.algorithm,
                    key,
                    validation,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            keys,
            leeway_seconds: settings.leeway_seconds,
            max_token_bytes: settings.max_token_bytes,
            cache_capacity: CACHE_CAPACITY,
            verified: RwLock::new(HashMap::new()),
        })
    }

    /// The same verifier with a verified-token cache of `entries` (at least one).
    pub fn with_cache_capacity(mut self, entries: usize) -> Self {
        self.cache_capacity = entries.max(1);
        self
    }

    /// How many verified tokens are cached now.
    #[doc(hidden)]
    pub fn cached_tokens(&self) -> usize {
        self.verified
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// The public keys among this verifier's keys (RS256) as a JWK Set (RFC 7517), for
    /// `/.well-known/jwks.json`. Shared HMAC secrets are never in it; with none, the set is empty.
    pub fn jwks(&self) -> serde_json::Value {
        use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
        let keys = self
            .keys
            .iter()
            .filter(|k| k.algorithm == Algorithm::RS256)
            .filter_map(|k| {
                let mut jwk = Jwk::from_decoding_key(&k.key, Some(k.algorithm.jwt())).ok()?;
                jwk.common.key_id = k.kid.clone();
                jwk.common.public_key_use = Some(PublicKeyUse::Signature);
                Some(jwk)
            })
            .collect();
        serde_json::to_value(JwkSet { keys }).unwrap_or_else(|_| serde_json::json!({"keys": []}))
    }

    /// Verifies `token` (without the `Bearer ` prefix) and returns who it speaks for.
    pub fn verify(&self, token: &str) -> Result<Identity, SecurityError> {
        self.verify_at(token, now_seconds())
    }

    /// [`verify`](Self::verify) at `now`, in seconds since the Unix epoch.
    pub(crate) fn verify_at(&self, token: &str, now: u64) -> Result<Identity, SecurityError> {
        if token.len() > self.max_token_bytes {
            return Err(SecurityError::Unauthenticated(format!(
                "token is {} bytes, more than the limit of {} (security.max_token_bytes)",
                token.len(),
                self.max_token_bytes
            )));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((identity, exp)) = self
            .verified
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&digest)
            && now < exp.saturating_add(self.leeway_seconds)
        {
            return Ok(identity.clone());
        }
        let (identity, exp) = self.verify_signed(token, now)?;
        let mut cache = self.verified.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.cache_capacity {
            cache.retain(|_, (_, exp)| now < exp.saturating_add(self.leeway_seconds));
            if cache.len() >= self.cache_capacity {
                cache.clear();
            }
        }
        cache.insert(digest, (identity.clone(), exp));
        Ok(identity)
    }

    /// `exp`, `nbf` and `iat` against `now`, each with the leeway.
    fn check_times(&self, claims: &Claims, now: u64) -> Result<(), SecurityError> {
        let unauth = |s: &str| Err(SecurityError::Unauthenticated(s.to_owned()));
        let leeway = self.leeway_seconds;
        if claims
            .exp
            .is_some_and(|exp| now >= exp.saturating_add(leeway))
        {
            return unauth("token has expired");
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(leeway))
        {
            return unauth("token is not valid yet (nbf)");
        }
        if claims
            .iat
            .is_some_and(|iat| iat > now.saturating_add(leeway))
        {
            return unauth("token was issued in the future (iat)");
        }
        Ok(())
    }

    fn verify_signed(&self, token: &str, now: u64) -> Result<(Identity, u64), SecurityError> {
        let unauth = |s: &str| SecurityError::Unauthenticated(s.to_owned());
        // An unknown or "none" algorithm fails here: the header's alg must be one we implement.
        let header = decode_header(token).map_err(|_| unauth("malformed bearer token"))?;
        // `crit` (RFC 7515 §4.1.11) lists extensions the recipient must understand. This
        // verifier understands none, so the member's mere presence is a refusal. It is looked
        // for in the raw header: jsonwebtoken's `Header::crit` reads `"crit": null` as absent.
        let raw_header = token
            .split('.')
            .next()
            .and_then(|h| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(h)
                    .ok()
            })
            .and_then(|h| {
                serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&h).ok()
            })
            .ok_or_else(|| unauth("malformed bearer token"))?;
        if raw_header.contains_key("crit") {
            return Err(unauth(
                "token header lists critical extensions ('crit'), which this verifier does not support",
            ));
        }
        let candidates = self.keys.iter().filter(|k| {
            k.algorithm.jwt() == header.alg
                && match (&header.kid, &k.kid) {
                    (Some(want), Some(have)) => want == have,
                    (Some(_), None) => false,
                    (None, _) => true,
                }
        });
        let mut last = unauth("no configured key matches the token's algorithm or key id");
        for k in candidates {
            match decode::<Claims>(token, &k.key, &k.validation) {
                Ok(data) => {
                    let c = data.claims;
                    self.check_times(&c, now)?;
                    if c.tenant_id.is_empty() {
                        return Err(unauth("token has an empty tenant_id claim"));
                    }
                    let identity = Identity {
                        subject: c.sub.unwrap_or_default().into(),
                        tenant: c.tenant_id.into(),
                        roles: c.roles.into(),
                        company_id: c.company_id.filter(|c| !c.is_empty()).map(Into::into),
                    };
                    return Ok((identity, c.exp.unwrap_or(0)));
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::InvalidSignature => unauth("token signature is invalid"),
                        K::ExpiredSignature => unauth("token has expired"),
                        K::ImmatureSignature => unauth("token is not valid yet (nbf)"),
                        K::InvalidIssuer => unauth("token issuer is not accepted"),
                        K::InvalidAudience => unauth("token audience is not accepted"),
                        K::MissingRequiredClaim(c) => {
                            SecurityError::Unauthenticated(format!("token lacks the '{c}' claim"))
                        }
                        K::Json(_) | K::InvalidClaimFormat(_) => unauth(
                            "token claims are malformed (sub, tenant_id, exp, iat: expected strings and numbers)",
                        ),
                        _ => unauth("token could not be verified"),
                    };
                    // Only a bad signature means another key might still accept it.
                    if !matches!(e.kind(), K::InvalidSignature) {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

/// Mints tokens with a key that has signing material. For development and tests.
pub struct TokenIssuer {
    kid: Option<String>,
    algorithm: Algorithm,
    key: EncodingKey,
    settings: TokenSettings,
}

impl TokenIssuer {
    /// An issuer using the first key of `keys` that can sign.
    pub fn new(keys: &[KeyMaterial], settings: TokenSettings) -> Result<Self, SecurityError> {
        let (i, k, sign) = keys
            .iter()
            .enumerate()
            .find_map(|(i, k)| k.sign.as_ref().map(|s| (i, k, s)))
            .ok_or_else(|| SecurityError::BadKey {
                key: "(none)".into(),
                reason: "no configured key can sign (an RS256 key needs private_key_file)".into(),
            })?;
        let key = match k.algorithm {
            Algorithm::HS256 => EncodingKey::from_secret(sign),
            Algorithm::RS256 => {
                EncodingKey::from_rsa_pem(sign).map_err(|e| SecurityError::BadKey {
                    key: key_name(k, i),
                    reason: format!("RS256 private key is not a usable PEM: {e}"),
                })?
            }
        };
        Ok(Self {
            kid: k.kid.clone(),
            algorithm: k.algorithm,
            key,
            settings,
        })
    }

    /// A token for `subject` in `tenant` with `roles`, valid for `ttl_seconds`.
    pub fn mint(
        &self,
        subject: &str,
        tenant: &str,
        roles: &[String],
        ttl_seconds: u64,
    ) -> Result<String, SecurityError> {
        self.mint_identity(
            &Identity {
                subject: subject.into(),
                tenant: tenant.into(),
                roles: roles.into(),
                company_id: None,
            },
            ttl_seconds,
        )
    }

    /// A token carrying all of `identity` (including `company_id`), valid for `ttl_seconds`.
    pub fn mint_identity(
        &self,
        identity: &Identity,
        ttl_seconds: u64,
    ) -> Result<String, SecurityError> {
        let now = now_seconds();
        let claims = Claims {
            sub: Some(identity.subject.to_string()),
            tenant_id: identity.tenant.to_string(),
            roles: identity.roles.to_vec(),
            company_id: identity.company_id.as_deref().map(str::to_owned),
            iss: Some(self.settings.issuer.clone()),
            aud: Some(Audience::One(self.settings.audience.clone())),
            exp: Some(now + ttl_seconds),
            nbf: None,
            iat: Some(now),
        };
        let mut header = Header::new(self.algorithm.jwt());
        header.kid = self.kid.clone();
        encode(&header, &claims, &self.key).map_err(|e| SecurityError::BadKey {
            key: self.kid.clone().unwrap_or_else(|| "#1".into()),
            reason: format!("could not sign: {e}"),
        })
    }
}

#[cfg(test)]
mod tests;
