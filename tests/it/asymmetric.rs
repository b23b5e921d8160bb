//! Asymmetric keys through the running proxy: PEM public keys and a JWKS endpoint, algorithm
//! confusion, unknown `kid` (one refetch, then 401), wrong key. Bad tokens never reach upstream.
//! A JWKS served over HTTPS by a private CA, trusted through `auth.jwks_ca_file`.

use crate::support::*;
use jsonwebtoken::{jwk::Jwk, Algorithm, EncodingKey, Header};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/auth/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

/// A JWKS endpoint serving the P-256 test key as `kid = "ec-1"`, counting its hits.
async fn jwks_server() -> (String, Arc<AtomicUsize>) {
    jwks_server_with(None).await
}

/// `jwks_server` with TLS when `tls` is Some (the certificate from tests/fixtures/tls).
async fn jwks_server_with(tls: Option<tokio_rustls::TlsAcceptor>) -> (String, Arc<AtomicUsize>) {
    let key = EncodingKey::from_ec_pem(&pem("ec256_private.pem")).unwrap();
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("ec-1".into());
    let doc = serde_json::json!({ "keys": [jwk] });
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let (h, doc) = (h.clone(), doc.clone());
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                axum::Json(doc)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let scheme = match tls {
        None => {
            tokio::spawn(async move { axum::serve(listener, app).await.ok() });
            "http"
        }
        Some(acceptor) => {
            let listener = tls::TlsListener {
                tcp: listener,
                acceptor,
            };
            tokio::spawn(async move { axum::serve(listener, app).await.ok() });
            "https"
        }
    };
    (format!("{scheme}://{addr}/jwks.json"), hits)
}

fn signed(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, customer: &str) -> String {
    let header = Header {
        alg,
        kid: kid.map(str::to_string),
        ..Default::default()
    };
    jsonwebtoken::encode(&header, &claims(customer), key).unwrap()
}

both!(
    /// RS256 via a PEM file and ES256 via JWKS are accepted; an HS256 token "signed" with the RSA
    /// public key (algorithm confusion), a token from another RSA key, and an unknown `kid` are 401;
    /// the unknown `kid` causes exactly one JWKS refetch. Only the two valid calls reach upstream.
    asymmetric_keys_and_their_attacks,
    |b| {
        let up = Upstream::start().await;
        let (jwks_url, hits) = jwks_server().await;
        let toml = base_config(up.addr).replace(
            "algorithms = [\"HS256\"]\nsecret_env = \"TOLLGATE_TEST_JWT_SECRET\"",
            &format!(
                "algorithms = [\"RS256\", \"ES256\"]\npublic_key_files = [\"{}\"]\njwks_url = \"{jwks_url}\"",
                fixture("rsa_public.pem")
            ),
        );
        let tg = Tollgate::start(&toml, b).await;
        let fetched_at_start = hits.load(Ordering::SeqCst);
        assert!(fetched_at_start >= 1, "JWKS fetched at start");

        let rsa = EncodingKey::from_rsa_pem(&pem("rsa_private.pem")).unwrap();
        let ec = EncodingKey::from_ec_pem(&pem("ec256_private.pem")).unwrap();
        let rsa2 = EncodingKey::from_rsa_pem(&pem("rsa2_private.pem")).unwrap();
        assert_eq!(
            tg.get_with_token("/signals", &signed(Algorithm::RS256, &rsa, None, "rs"))
                .await
                .status(),
            200
        );
        assert_eq!(
            tg.get_with_token(
                "/signals",
                &signed(Algorithm::ES256, &ec, Some("ec-1"), "ec")
            )
            .await
            .status(),
            200
        );

        let confused = signed(
            Algorithm::HS256,
            &EncodingKey::from_secret(&pem("rsa_public.pem")),
            None,
            "rs",
        );
        let wrong_key = signed(Algorithm::RS256, &rsa2, None, "rs");
        for (name, t) in [
            ("algorithm confusion", confused),
            ("wrong RSA key", wrong_key),
        ] {
            let (status, ty, _) = problem(tg.get_with_token("/signals", &t).await).await;
            assert_eq!(
                (status, ty.as_str()),
                (401, "urn:tollgate:problem:invalid-token"),
                "{name}"
            );
        }

        let unknown_kid = signed(Algorithm::ES256, &ec, Some("ec-rotated-away"), "ec");
        let (status, ty, _) = problem(tg.get_with_token("/signals", &unknown_kid).await).await;
        assert_eq!(
            (status, ty.as_str()),
            (401, "urn:tollgate:problem:invalid-token")
        );
        assert_eq!(
            hits.load(Ordering::SeqCst),
            fetched_at_start + 1,
            "exactly one refetch for an unknown kid"
        );
        // Within the 30 s cooldown a second unknown kid does not hammer the JWKS endpoint.
        let (status, _, _) = problem(tg.get_with_token("/signals", &unknown_kid).await).await;
        assert_eq!(status, 401);
        assert_eq!(hits.load(Ordering::SeqCst), fetched_at_start + 1);

        assert_eq!(up.hits(), 2, "only the valid tokens reached the upstream");
    }
);

/// An https JWKS from a private CA works end to end when `auth.jwks_ca_file` names the CA: the
/// config key reaches the verifier, the JWKS is fetched at start, and its key admits a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_jwks_trusted_through_jwks_ca_file() {
    let up = Upstream::start().await;
    let (jwks_url, hits) = jwks_server_with(Some(tls::acceptor("server"))).await;
    assert!(jwks_url.starts_with("https://"), "{jwks_url}");
    let toml = base_config(up.addr).replace(
        "algorithms = [\"HS256\"]\nsecret_env = \"TOLLGATE_TEST_JWT_SECRET\"",
        &format!(
            "algorithms = [\"ES256\"]\njwks_url = \"{jwks_url}\"\njwks_ca_file = \"{}/tests/fixtures/tls/ca.pem\"",
            env!("CARGO_MANIFEST_DIR")
        ),
    );
    let tg = Tollgate::start(&toml, Backend::Embedded).await;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "JWKS fetched over TLS at start"
    );

    let ec = EncodingKey::from_ec_pem(&pem("ec256_private.pem")).unwrap();
    let token = signed(Algorithm::ES256, &ec, Some("ec-1"), "tls");
    assert_eq!(tg.get_with_token("/signals", &token).await.status(), 200);
    assert_eq!(up.hits(), 1);
}

/// `auth.jwks_ca_file` without `auth.jwks_url` is a config error under its own key.
#[test]
fn jwks_ca_file_without_jwks_url_is_a_config_error() {
    let toml = base_config("127.0.0.1:9".parse().unwrap()).replace(
        "[auth]\n",
        "[auth]\njwks_ca_file = \"tests/fixtures/tls/ca.pem\"\n",
    );
    let errors = tollgate::config::Config::from_toml(&toml).unwrap_err().0;
    assert_eq!(
        errors,
        vec![tollgate::config::ConfigError {
            key: "auth.jwks_ca_file".into(),
            message: "only used for the JWKS fetch: set jwks_url too, or remove it".into(),
        }]
    );
}
