//! Token verification and minting, including the refusals.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};

use super::*;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

fn settings() -> TokenSettings {
    TokenSettings {
        issuer: "erp".into(),
        audience: "providers".into(),
        leeway_seconds: 0,
        max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
    }
}

fn hs(kid: Option<&str>, secret: &[u8]) -> KeyMaterial {
    KeyMaterial {
        kid: kid.map(Into::into),
        algorithm: Algorithm::HS256,
        verify: secret.to_vec(),
        sign: Some(secret.to_vec()),
    }
}

fn rs(name: &str, with_private: bool) -> KeyMaterial {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/");
    KeyMaterial {
        kid: Some(name.into()),
        algorithm: Algorithm::RS256,
        verify: std::fs::read(format!("{dir}{name}.pub.pem")).unwrap(),
        sign: with_private.then(|| std::fs::read(format!("{dir}{name}.key.pem")).unwrap()),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims() -> Value {
    json!({"sub": "ada", "tenant_id": "acme", "roles": ["clerk"], "iss": "erp", "aud": "providers", "exp": now() + 60, "iat": now()})
}

fn sign_hs(claims: &Value, secret: &[u8]) -> String {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn refused(v: &TokenVerifier, token: &str) -> String {
    match v.verify(token) {
        Err(SecurityError::Unauthenticated(why)) => why,
        other => panic!("expected Unauthenticated, got {other:?}"),
    }
}

#[test]
fn hs256_round_trip_gives_the_identity() {
    let keys = [hs(None, SECRET)];
    let token = TokenIssuer::new(&keys, settings())
        .unwrap()
        .mint("ada", "acme", &["clerk".into()], 60)
        .unwrap();
    let id = TokenVerifier::new(&keys, settings())
        .unwrap()
        .verify(&token)
        .unwrap();
    assert_eq!(
        id,
        Identity {
            subject: "ada".into(),
            tenant: "acme".into(),
            roles: Arc::from(["clerk".to_owned()]),
            company_id: None,
        }
    );
}

#[test]
fn rs256_round_trip_and_wrong_key() {
    let signer = TokenIssuer::new(&[rs("rs256", true)], settings()).unwrap();
    let token = signer.mint("bob", "globex", &[], 60).unwrap();
    let good = TokenVerifier::new(&[rs("rs256", false)], settings()).unwrap();
    assert_eq!(&*good.verify(&token).unwrap().tenant, "globex");

    // Same kid, other key pair: the signature cannot check out.
    let mut other = rs("other", false);
    other.kid = Some("rs256".into());
    let wrong = TokenVerifier::new(&[other], settings()).unwrap();
    assert_eq!(refused(&wrong, &token), "token signature is invalid");
}

#[test]
fn refuses_alg_none_string_exp_wrong_secret_and_expiry() {
    let v = TokenVerifier::new(&[hs(None, SECRET)], settings()).unwrap();

    let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims().to_string());
    assert_eq!(
        refused(&v, &format!("{head}.{body}.")),
        "malformed bearer token"
    );

    let mut c = claims();
    c["exp"] = json!((now() + 600).to_string());
    let why = refused(&v, &sign_hs(&c, SECRET));
    assert!(why.starts_with("token claims are malformed"), "{why}");

    assert_eq!(
        refused(&v, &sign_hs(&claims(), b"another-secret-another-secret-xx")),
        "token signature is invalid"
    );

    let mut c = claims();
    c["exp"] = json!(now() - 5);
    assert_eq!(refused(&v, &sign_hs(&c, SECRET)), "token has expired");

    let mut c = claims();
    c["iss"] = json!("someone-else");
    assert_eq!(
        refused(&v, &sign_hs(&c, SECRET)),
        "token issuer is not accepted"
    );

    let mut c = claims();
    c["aud"] = json!("elsewhere");
    assert_eq!(
        refused(&v, &sign_hs(&c, SECRET)),
        "token audience is not accepted"
    );

    let mut c = claims();
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        refused(&v, &sign_hs(&c, SECRET)),
        "token lacks the 'exp' claim"
    );

    let mut c = claims();
    c.as_object_mut().unwrap().remove("tenant_id");
    assert!(refused(&v, &sign_hs(&c, SECRET)).starts_with("token claims are malformed"));

    assert_eq!(refused(&v, "not-a-jwt"), "malformed bearer token");
}

#[test]
fn an_hs256_token_is_not_checked_against_an_rs256_public_key() {
    // Algorithm confusion: sign HS256 with the RSA public key's bytes.
    let public = rs("rs256", false);
    let forged = sign_hs(&claims(), &public.verify);
    let v = TokenVerifier::new(&[public], settings()).unwrap();
    assert_eq!(
        refused(&v, &forged),
        "no configured key matches the token's algorithm or key id"
    );
}

#[test]
fn kid_picks_the_key() {
    let keys = [
        hs(Some("old"), b"old-secret-old-secret-old-secret"),
        hs(Some("new"), SECRET),
    ];
    let v = TokenVerifier::new(&keys, settings()).unwrap();
    let token = TokenIssuer::new(&keys[1..], settings())
        .unwrap()
        .mint("ada", "acme", &[], 60)
        .unwrap();
    assert_eq!(&*v.verify(&token).unwrap().subject, "ada");
    let unknown = TokenIssuer::new(&[hs(Some("gone"), SECRET)], settings())
        .unwrap()
        .mint("ada", "acme", &[], 60)
        .unwrap();
    assert_eq!(
        refused(&v, &unknown),
        "no configured key matches the token's algorithm or key id"
    );
}

#[test]
fn refuses_weak_secrets_and_bad_pem() {
    let err = TokenVerifier::new(&[hs(Some("k1"), b"short")], settings())
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "key 'k1': HS256 secret is 5 bytes; at least 32 are required"
    );
    let mut bad = rs("rs256", false);
    bad.verify = b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n".to_vec();
    let err = TokenVerifier::new(&[bad], settings()).err().unwrap();
    assert!(
        err.to_string()
            .starts_with("key 'rs256': RS256 public key is not a usable PEM"),
        "{err}"
    );
}

#[test]
fn a_cached_token_is_served_from_the_cache_until_it_expires_and_a_forged_one_is_no_hit() {
    // One instant for the whole test, so that no second ticks between minting and checking.
    let t = now();
    let mut c = claims();
    c["iat"] = json!(t);
    c["exp"] = json!(t + 60);
    let token = sign_hs(&c, SECRET);
    let v = TokenVerifier::new(&[hs(None, SECRET)], settings()).unwrap();
    assert_eq!(&*v.verify_at(&token, t).unwrap().tenant, "acme");
    assert_eq!(v.cached_tokens(), 1);
    // A full check one second before `iat` refuses the token; a cache hit checks only `exp`,
    // so accepting it there shows the second call never reached the signature and claims.
    let uncached = TokenVerifier::new(&[hs(None, SECRET)], settings()).unwrap();
    assert_eq!(
        refused_at(&uncached, &token, t - 1),
        "token was issued in the future (iat)"
    );
    assert_eq!(
        &*v.verify_at(&token, t - 1).unwrap().tenant,
        "acme",
        "served from the cache"
    );
    assert_eq!(&*v.verify_at(&token, t + 59).unwrap().tenant, "acme");
    assert_eq!(v.cached_tokens(), 1, "a hit adds nothing");
    assert_eq!(
        refused_at(&v, &token, t + 60),
        "token has expired",
        "the cache does not outlive exp"
    );
    // A forged variant of a cached token is not a cache hit.
    let fresh = sign_hs(&claims(), SECRET);
    v.verify(&fresh).unwrap();
    // Change a character well inside the signature, where every bit counts.
    let at = fresh.len() - 10;
    let swapped = if &fresh[at..=at] == "A" { "B" } else { "A" };
    let forged = format!("{}{swapped}{}", &fresh[..at], &fresh[at + 1..]);
    assert_eq!(refused(&v, &forged), "token signature is invalid");
}

fn refused_at(v: &TokenVerifier, token: &str, at: u64) -> String {
    match v.verify_at(token, at) {
        Err(SecurityError::Unauthenticated(why)) => why,
        other => panic!("expected Unauthenticated, got {other:?}"),
    }
}

#[test]
fn the_cache_is_bounded_prunes_expired_entries_then_clears() {
    let v = TokenVerifier::new(&[hs(None, SECRET)], settings())
        .unwrap()
        .with_cache_capacity(3);
    let t = now();
    let token = |sub: &str, ttl: u64| {
        let mut c = claims();
        c["sub"] = json!(sub);
        c["iat"] = json!(t);
        c["exp"] = json!(t + ttl);
        sign_hs(&c, SECRET)
    };
    let short = token("short", 10);
    for minted in [&short, &token("a", 600), &token("b", 600)] {
        v.verify_at(minted, t).unwrap();
    }
    assert_eq!(v.cached_tokens(), 3);
    // Full: the expired entry goes first, and the newcomer takes its place.
    v.verify_at(&token("c", 600), t + 20).unwrap();
    assert_eq!(v.cached_tokens(), 3);
    // Full of live entries: the cache is emptied, then holds the newcomer.
    v.verify_at(&token("d", 600), t + 20).unwrap();
    assert_eq!(v.cached_tokens(), 1);
}

#[test]
fn tokens_longer_than_the_limit_are_refused_before_decoding() {
    let token = sign_hs(&claims(), SECRET);
    let at = |max: usize| {
        TokenVerifier::new(
            &[hs(None, SECRET)],
            TokenSettings {
                max_token_bytes: max,
                ..settings()
            },
        )
        .unwrap()
    };
    assert_eq!(&*at(token.len()).verify(&token).unwrap().tenant, "acme");
    let v = at(token.len() - 1);
    assert_eq!(
        refused(&v, &token),
        format!(
            "token is {} bytes, more than the limit of {} (security.max_token_bytes)",
            token.len(),
            token.len() - 1
        )
    );
    assert_eq!(v.cached_tokens(), 0);
    // Not even decoded: garbage of that size gets the same answer, not "malformed".
    let junk = "x".repeat(token.len());
    assert!(refused(&v, &junk).starts_with("token is "));
}

/// A token signed with `SECRET` under a header written by hand, members jsonwebtoken would not write.
fn sign_with_raw_header(header: &str, claims: &Value) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = jsonwebtoken::crypto::sign(
        signing_input.as_bytes(),
        &EncodingKey::from_secret(SECRET),
        jsonwebtoken::Algorithm::HS256,
    )
    .unwrap();
    format!("{signing_input}.{signature}")
}

#[test]
fn a_crit_header_is_refused() {
    let v = TokenVerifier::new(&[hs(None, SECRET)], settings()).unwrap();
    // The control: the same hand-written header without `crit` is accepted.
    let plain = sign_with_raw_header(r#"{"alg":"HS256","typ":"JWT"}"#, &claims());
    assert_eq!(&*v.verify(&plain).unwrap().tenant, "acme");
    // `"crit": null` reads as no `crit` in jsonwebtoken's header type; the member is still there.
    for header in [
        r#"{"alg":"HS256","typ":"JWT","crit":["exp"],"exp":1}"#,
        r#"{"alg":"HS256","typ":"JWT","crit":null}"#,
    ] {
        assert_eq!(
            refused(&v, &sign_with_raw_header(header, &claims())),
            "token header lists critical extensions ('crit'), which this verifier does not support",
            "{header}"
        );
    }
    assert_eq!(v.cached_tokens(), 1, "only the control was cached");
}

#[test]
fn iat_nbf_and_exp_hold_at_the_edge_of_the_leeway() {
    let v = TokenVerifier::new(
        &[hs(None, SECRET)],
        TokenSettings {
            leeway_seconds: 30,
            ..settings()
        },
    )
    .unwrap();
    let t = now();
    let with = |field: &str, value: u64| {
        let mut c = claims();
        c["exp"] = json!(t + 3600);
        c[field] = json!(value);
        sign_hs(&c, SECRET)
    };
    assert!(v.verify_at(&with("iat", t + 30), t).is_ok());
    assert_eq!(
        refused_at(&v, &with("iat", t + 31), t),
        "token was issued in the future (iat)"
    );
    assert!(v.verify_at(&with("nbf", t + 30), t).is_ok());
    assert_eq!(
        refused_at(&v, &with("nbf", t + 31), t),
        "token is not valid yet (nbf)"
    );
    let expiring = with("exp", t);
    assert!(v.verify_at(&expiring, t + 29).is_ok());
    let fresh = TokenVerifier::new(
        &[hs(None, SECRET)],
        TokenSettings {
            leeway_seconds: 30,
            ..settings()
        },
    )
    .unwrap();
    assert_eq!(refused_at(&fresh, &expiring, t + 30), "token has expired");
}

#[test]
fn a_leeway_beyond_the_maximum_is_a_setting_error_not_a_panic() {
    for leeway in [MAX_LEEWAY_SECONDS + 1, u64::MAX] {
        let err = TokenVerifier::new(
            &[hs(None, SECRET)],
            TokenSettings {
                leeway_seconds: leeway,
                ..settings()
            },
        )
        .err()
        .unwrap();
        assert_eq!(
            err.to_string(),
            format!("security.leeway_seconds: {leeway} is out of range (at most 600)")
        );
    }
    assert!(
        TokenVerifier::new(
            &[hs(None, SECRET)],
            TokenSettings {
                leeway_seconds: MAX_LEEWAY_SECONDS,
                ..settings()
            },
        )
        .is_ok()
    );
}

#[test]
fn an_audience_array_is_accepted_when_it_names_us() {
    let v = TokenVerifier::new(&[hs(None, SECRET)], settings()).unwrap();
    let mut c = claims();
    c["aud"] = json!(["billing", "providers"]);
    assert_eq!(&*v.verify(&sign_hs(&c, SECRET)).unwrap().tenant, "acme");
    c["aud"] = json!(["billing"]);
    assert_eq!(
        refused(&v, &sign_hs(&c, SECRET)),
        "token audience is not accepted"
    );
}
