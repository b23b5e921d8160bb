//! Forwarded headers: the upstream is told who called and how (`X-Forwarded-For`, `-Proto`,
//! `-Host`); what a caller claims in them is kept only from a `proxy.trusted_proxies` address,
//! and the access log names the client behind such a proxy.

use crate::support::serve::{serve_config, until, Serve};
use crate::support::*;

fn seen(up: &Upstream, name: &str) -> Option<String> {
    up.last()
        .and_then(|s| s.headers.get(name).map(|v| v.to_str().unwrap().to_owned()))
}

/// A call claiming to come from elsewhere, through `proxy`.
async fn spoofing_call(client: &reqwest::Client, url: String) -> u16 {
    client
        .get(url)
        .bearer_auth(token("fwd"))
        .header("X-Forwarded-For", "6.6.6.6")
        .header("X-Forwarded-Proto", "https")
        .header("X-Forwarded-Host", "evil.example")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// From a client that is no trusted proxy, the chain is replaced by its own address, the
/// scheme and host by what tollgate saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_client_cannot_claim_another_address() {
    let up = Upstream::start().await;
    let tg = Tollgate::start(&base_config(up.addr), Backend::Embedded).await;
    assert_eq!(spoofing_call(&tg.client, tg.url("/signals")).await, 200);
    assert_eq!(seen(&up, "x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen(&up, "x-forwarded-proto").as_deref(), Some("http"));
    let host = tg.proxy.to_string();
    assert_eq!(seen(&up, "x-forwarded-host"), Some(host));
}

/// Behind a trusted proxy the chain is extended and its scheme and host kept; the access log
/// names the client the proxy saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_chain_is_kept_and_logged() {
    let up = Upstream::start().await;
    let dir = TempDir(std::env::temp_dir().join(unique("forwarded")));
    let (proxy, admin) = (free_port(), free_port());
    let config = serve_config(&base_config(up.addr), &dir, proxy, admin).replacen(
        "[proxy]\n",
        "[proxy]\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
        1,
    );
    let file = dir.0.join("tollgate.toml");
    std::fs::write(&file, config).unwrap();
    let serve = Serve::spawn_with(&file, &dir, &["--log-format", "json"]);
    let client = reqwest::Client::new();
    let url = format!("http://{proxy}/signals");
    until(30, "tollgate serving", || {
        let (client, url) = (client.clone(), url.clone());
        async move { client.get(url).send().await.ok() }
    })
    .await;
    assert_eq!(spoofing_call(&client, url).await, 200);
    assert_eq!(
        seen(&up, "x-forwarded-for").as_deref(),
        Some("6.6.6.6, 127.0.0.1")
    );
    assert_eq!(seen(&up, "x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(
        seen(&up, "x-forwarded-host").as_deref(),
        Some("evil.example")
    );
    // The access-log line of the call, as JSON.
    let access = |log: &str| -> Vec<serde_json::Value> {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "tollgate::access" && v["fields"]["customer"] == "fwd")
            .collect()
    };
    let mut log = String::new();
    for _ in 0..200 {
        log = std::fs::read_to_string(&serve.log).unwrap_or_default();
        if !access(&log).is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let lines = access(&log);
    assert_eq!(lines.len(), 1, "one access-log line for the call:\n{log}");
    assert_eq!(lines[0]["fields"]["client_ip"], "6.6.6.6", "{}", lines[0]);
}
