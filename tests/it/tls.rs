//! TLS at both ends. Upstreams: an HTTPS upstream signed by a private CA is trusted through
//! `ca_file` and metered like any other; one whose certificate is for another name is 502
//! `upstream-unavailable` and refunded, and never sees the request. The listener: `proxy.tls`
//! serves HTTP/2 and HTTP/1.1 (curl `--http2` gets 200 and the RateLimit headers), and SIGHUP
//! swaps its certificate for new handshakes while a connection already open keeps working.

use crate::support::serve::{serve_config, signal, until, Serve};
use crate::support::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `base_config` with the `api` upstream over HTTPS to `up`, checked as `localhost` against the
/// test CA.
fn https_config(up: std::net::SocketAddr) -> String {
    base_config(up).replace(
        &format!("targets = [\"{up}\"]\n"),
        &format!(
            "targets = [\"{up}\"]\ntls = true\nsni = \"localhost\"\nca_file = \"{}\"\n",
            tls::fixture("ca.pem")
        ),
    )
}

both!(
    /// Metered calls pass to an HTTPS upstream behind the test CA and are charged.
    https_upstream_behind_a_private_ca,
    |b| {
        let up = Upstream::start_tls("server").await;
        let config = https_config(up.addr);
        assert!(config.contains("tls = true"), "{config}");
        let tg = Tollgate::start(&config, b).await;
        for left in ["4", "3"] {
            let r = tg.get("/signals", Some("tess")).await;
            assert_eq!(r.status(), 200);
            assert_eq!(
                r.headers()["x-ratelimit-remaining"].to_str().unwrap(),
                left
            );
        }
        assert_eq!(up.hits(), 2, "both calls reached the HTTPS upstream");
        assert_eq!(tg.wait_ledger("tess", 2).await, (2, 2));
        if b == Backend::Shared {
            assert_eq!(tg.redis_used("tess", "api_calls").await, Some(2));
        }
    }
);

both!(
    /// A certificate for another name fails the handshake: 502, the reservation refunded, and
    /// the upstream never sees the request.
    https_upstream_with_the_wrong_name_is_502_and_refunded,
    |b| {
        let up = Upstream::start_tls("wrong_name").await;
        let tg = Tollgate::start(&https_config(up.addr), b).await;
        let (status, ty, _) = problem(tg.get("/signals", Some("walt")).await).await;
        assert_eq!(
            (status, ty.as_str()),
            (502, "urn:tollgate:problem:upstream-unavailable")
        );
        assert_eq!(up.hits(), 0);
        assert_eq!(tg.wait_ledger("walt", 1).await, (1, 0));
        if b == Backend::Shared {
            assert_eq!(tg.redis_used("walt", "api_calls").await, Some(0));
        }
    }
);

/// Without `ca_file` the private CA is not trusted: 502 as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_needs_its_ca() {
    let up = Upstream::start_tls("server").await;
    let config =
        https_config(up.addr).replace(&format!("ca_file = \"{}\"\n", tls::fixture("ca.pem")), "");
    let tg = Tollgate::start(&config, Backend::Embedded).await;
    assert_eq!(tg.get("/signals", Some("una")).await.status(), 502);
    assert_eq!(up.hits(), 0);
}

/// `check-config` reads the TLS files: a missing CA file and a key that is not the
/// certificate's are reported with their keys, exit 64.
#[test]
fn check_config_reads_the_tls_files() {
    let dir = TempDir(std::env::temp_dir().join(unique("tls-check")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let up: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let config = https_config(up)
        .replace(&tls::fixture("ca.pem"), "/nonexistent/ca.pem")
        .replacen(
            "[proxy]\n",
            &format!(
                "[proxy]\ntls = {{ cert_file = \"{}\", key_file = \"{}\" }}\n",
                tls::fixture("server.pem"),
                tls::fixture("wrong_name_key.pem")
            ),
            1,
        );
    let file = dir.0.join("tollgate.toml");
    std::fs::write(&file, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("upstreams.api.ca_file: cannot read /nonexistent/ca.pem"),
        "{stderr}"
    );
    assert!(
        stderr.contains("proxy.tls.cert_file:") && stderr.contains("does not match"),
        "{stderr}"
    );
}

/// A TLS listener: `curl --http2` negotiates HTTP/2 and gets 200 with the RateLimit headers;
/// HTTP/1.1 over TLS works too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_speaks_http2() {
    let up = Upstream::start().await;
    let tg = Tollgate::start_with(&base_config(up.addr), Backend::Embedded, None, |c| {
        c.proxy.tls = Some(tollgate::config::ListenerTls {
            cert_file: tls::fixture("server.pem").into(),
            key_file: tls::fixture("server_key.pem").into(),
        });
    })
    .await;
    let url = format!("https://localhost:{}/signals", tg.proxy.port());
    let resolve = format!("localhost:{}:127.0.0.1", tg.proxy.port());
    let auth = format!("Authorization: Bearer {}", token("hana"));
    let curl = |version: &'static str| {
        let (url, resolve, auth) = (url.clone(), resolve.clone(), auth.clone());
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("curl")
                .args(["-sS", "-i", version, "--cacert", &tls::fixture("ca.pem")])
                .args(["--resolve", &resolve, "-H", &auth, &url])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).to_lowercase()
        })
    };
    let h2 = curl("--http2").await.unwrap();
    assert!(h2.starts_with("http/2 200"), "{h2}");
    assert!(
        h2.contains("\nratelimit-policy: \"api_calls\";q=5;w="),
        "{h2}"
    );
    assert!(h2.contains("\nratelimit: \"api_calls\";r=4;t="), "{h2}");
    assert!(h2.contains("\nx-ratelimit-remaining: 4"), "{h2}");
    let h1 = curl("--http1.1").await.unwrap();
    assert!(h1.starts_with("http/1.1 200"), "{h1}");
    assert!(h1.contains("\nx-ratelimit-remaining: 3"), "{h1}");
    assert_eq!(up.hits(), 2);
    assert_eq!(tg.wait_ledger("hana", 2).await, (2, 2));
}

/// A TLS client trusting the test CA, connected to `addr` as `name`.
async fn tls_connect(
    addr: std::net::SocketAddr,
    name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(tls::fixture("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// One `GET /public` on an open HTTP/1.1 connection; the status line.
async fn get_public<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> String {
    s.write_all(b"GET /public HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&buf).contains("\r\n\r\nok") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    text.lines().next().unwrap().to_string()
}

/// SIGHUP rereads `proxy.tls`: new handshakes get the new certificate, a connection opened
/// before keeps serving; a broken file on the next SIGHUP keeps the certificate in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_listener_certificate_without_dropping_connections() {
    let up = Upstream::start().await;
    let dir = TempDir(std::env::temp_dir().join(unique("tls-reload")));
    let (proxy, admin) = (free_port(), free_port());
    let mut config = serve_config(&base_config(up.addr), &dir, proxy, admin);
    let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    std::fs::copy(tls::fixture("server.pem"), &cert).unwrap();
    std::fs::copy(tls::fixture("server_key.pem"), &key).unwrap();
    config = config.replacen(
        "[proxy]\n",
        &format!(
            "[proxy]\ntls = {{ cert_file = \"{}\", key_file = \"{}\" }}\n",
            cert.display(),
            key.display()
        ),
        1,
    );
    let file = dir.0.join("tollgate.toml");
    std::fs::write(&file, config).unwrap();
    let serve = Serve::spawn(&file, &dir);
    let mut open = until(30, "the TLS listener", || async {
        tls_connect(proxy, "localhost").await.ok()
    })
    .await;
    assert_eq!(get_public(&mut open).await, "HTTP/1.1 200 OK");
    assert!(tls_connect(proxy, "wrong-name.invalid").await.is_err());

    std::fs::copy(tls::fixture("wrong_name.pem"), &cert).unwrap();
    std::fs::copy(tls::fixture("wrong_name_key.pem"), &key).unwrap();
    signal(&serve.child, "-HUP");
    let mut fresh = until(10, "the new certificate", || async {
        tls_connect(proxy, "wrong-name.invalid").await.ok()
    })
    .await;
    assert_eq!(get_public(&mut fresh).await, "HTTP/1.1 200 OK");
    assert!(
        tls_connect(proxy, "localhost").await.is_err(),
        "new handshakes get the new certificate"
    );
    assert_eq!(
        get_public(&mut open).await,
        "HTTP/1.1 200 OK",
        "the connection opened before the reload still serves"
    );

    std::fs::write(&key, "not a key").unwrap();
    signal(&serve.child, "-HUP");
    until(10, "the refused reload in the log", || async {
        let log = std::fs::read_to_string(&serve.log).unwrap_or_default();
        log.contains("not reloaded").then_some(())
    })
    .await;
    assert!(tls_connect(proxy, "wrong-name.invalid").await.is_ok());
}
