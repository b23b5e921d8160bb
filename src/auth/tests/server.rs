//! A local JWKS endpoint for the tests: plain http, or https with a fixture certificate; it counts
//! its hits and can change its answer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

use super::{claims, jwk_for, settings, sign_pem, tls_fixture};
use crate::auth::Verifier;

/// A TCP listener that completes a TLS handshake before handing a connection to axum.
pub(crate) struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl TlsListener {
    /// Serves `tests/fixtures/tls/{cert}.pem` with `{cert}_key.pem`.
    fn new(tcp: tokio::net::TcpListener, cert: &str) -> TlsListener {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let chain = CertificateDer::pem_file_iter(tls_fixture(&format!("{cert}.pem")))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(tls_fixture(&format!("{cert}_key.pem"))).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        TlsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            // A client that refuses our certificate fails the handshake: wait for the next.
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A local JWKS endpoint that counts its hits and can change its answer.
pub(crate) struct JwksServer {
    pub(crate) url: String,
    hits: Arc<AtomicUsize>,
    answer: Arc<Mutex<(u16, Value)>>,
}

impl JwksServer {
    /// Plain http on 127.0.0.1.
    pub(crate) async fn start(doc: Value) -> JwksServer {
        Self::start_with(doc, None).await
    }

    /// https on 127.0.0.1 with the fixture certificate `cert` (see tests/fixtures/tls).
    pub(crate) async fn start_tls(doc: Value, cert: &str) -> JwksServer {
        Self::start_with(doc, Some(cert)).await
    }

    async fn start_with(doc: Value, tls_cert: Option<&str>) -> JwksServer {
        let hits = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(Mutex::new((200u16, doc)));
        let handler = {
            let (hits, answer) = (Arc::clone(&hits), Arc::clone(&answer));
            move || {
                let (hits, answer) = (Arc::clone(&hits), Arc::clone(&answer));
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let (status, doc) = answer.lock().unwrap().clone();
                    (
                        axum::http::StatusCode::from_u16(status).unwrap(),
                        axum::Json(doc),
                    )
                }
            }
        };
        let app = axum::Router::new().route("/jwks.json", axum::routing::get(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scheme = match tls_cert {
            None => {
                tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
                "http"
            }
            Some(cert) => {
                let listener = TlsListener::new(listener, cert);
                tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
                "https"
            }
        };
        JwksServer {
            url: format!("{scheme}://{addr}/jwks.json"),
            hits,
            answer,
        }
    }

    pub(crate) fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub(crate) fn answer(&self, status: u16, doc: Value) {
        *self.answer.lock().unwrap() = (status, doc);
    }
}

pub(crate) async fn jwks_verifier(server: &JwksServer, algorithms: &[Algorithm]) -> Verifier {
    let mut s = settings(algorithms);
    s.jwks_url = Some(server.url.clone());
    Verifier::new(s).await.unwrap()
}

/// The fixture RSA key pairs as (private key file, `kid`) for JWKS tests.
pub(crate) const K1: (&str, &str) = ("rsa_private.pem", "k1");
pub(crate) const K2: (&str, &str) = ("rsa2_private.pem", "k2");

/// A JWKS document with one RS256 key per (private key file, `kid`).
pub(crate) fn rs256_jwks(keys: &[(&str, &str)]) -> Value {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(private, kid)| jwk_for(Algorithm::RS256, private, kid))
        .collect();
    json!({ "keys": keys })
}

/// A plain-http JWKS endpoint serving `keys`, and an RS256-only verifier that uses it.
pub(crate) async fn rs256_jwks_verifier(keys: &[(&str, &str)]) -> (JwksServer, Verifier) {
    let server = JwksServer::start(rs256_jwks(keys)).await;
    let verifier = jwks_verifier(&server, &[Algorithm::RS256]).await;
    (server, verifier)
}

/// An RS256 token for `sub`, signed with the key pair's private key and naming its `kid`.
pub(crate) fn rs256((private, kid): (&str, &str), sub: &str) -> String {
    sign_pem(Algorithm::RS256, private, Some(kid), &claims(sub))
}
