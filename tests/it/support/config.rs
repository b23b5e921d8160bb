//! The standard test config.

use std::net::SocketAddr;

/// The standard test config: plans free (default, 5 units, deny), pro (1000, overage, export_pdf),
/// tight (rate 2/min), closed (fail mode closed), routes covering every behaviour.
pub fn base_config(upstream: SocketAddr) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
drain_delay = "0s"
shutdown_grace = "0s"
strip_authorization = true

[admin]
token_env = "TOLLGATE_TEST_ADMIN_TOKEN"

[auth]
algorithms = ["HS256"]
secret_env = "TOLLGATE_TEST_JWT_SECRET"
issuer = "https://issuer.test/"
audience = "api"
leeway_seconds = 5
customer_claim = "sub"

[upstreams.api]
targets = ["{upstream}"]

[meters.api_calls]
[meters.tokens]

[[routes]]
match = "GET /signals"
upstream = "api"
cost = 1

[[routes]]
match = "GET /signals/history/{{symbol}}"
upstream = "api"
cost = 2

[[routes]]
name = "export-pdf"
match = "GET /export/pdf"
upstream = "api"
cost = 5
feature = "export_pdf"

[[routes]]
match = "GET /fail"
upstream = "api"
cost = 1

[[routes]]
name = "fail-always-charged"
match = "GET /fail/always"
upstream = "api"
cost = 1
charge = "always"

[[routes]]
match = "GET /cost"
upstream = "api"
meter = "tokens"
cost = 10
max_cost = 500
cost_from_response_header = "X-Usage-Tokens"

[[routes]]
match = "GET /cost-bad"
upstream = "api"
meter = "tokens"
cost = 10
cost_from_response_header = "X-Usage-Tokens"

[[routes]]
match = "GET /slow"
upstream = "api"
cost = 1

[[routes]]
match = "GET /public"
upstream = "api"
auth = "public"

[plans.free]
default = true
rate_per_minute = 600
quotas.api_calls = {{ included = 5, overage = "deny" }}
quotas.tokens = {{ included = 100, overage = "deny" }}

[plans.pro]
features = ["export_pdf"]
quotas.api_calls = {{ included = 1000, overage = "allow", unit_price_micros = 20000 }}
quotas.tokens = {{ unlimited = true }}

[plans.tight]
rate_per_minute = 2
burst = 2
quotas.api_calls = {{ included = 1000 }}
quotas.tokens = {{ unlimited = true }}

[plans.closed]
fail_mode = "closed"
quotas.api_calls = {{ included = 1000 }}
quotas.tokens = {{ unlimited = true }}
"#
    )
}

/// The benches' config: one metered route `GET /signals` (cost 1) to `upstream`, and a default
/// plan `bench` whose keys are `plan` (quota lines included). `proxy` and `admin` add keys to
/// their tables (listen addresses, threads). Storage is filled in by whoever starts it.
#[allow(dead_code)] // used by the benches, which include this module
pub fn bench_config(upstream: SocketAddr, proxy: &str, admin: &str, plan: &str) -> String {
    format!(
        r#"
[proxy]
{proxy}# Not 0: pingora drops the tasks still running when the grace period ends, and a request
# dropped after its Redis reservation is neither refunded nor in the ledger.
shutdown_grace = "1s"
strip_authorization = true

[admin]
{admin}token_env = "TOLLGATE_TEST_ADMIN_TOKEN"

[auth]
algorithms = ["HS256"]
secret_env = "TOLLGATE_TEST_JWT_SECRET"
issuer = "https://issuer.test/"
audience = "api"

[upstreams.api]
targets = ["{upstream}"]

[meters.api_calls]

[[routes]]
match = "GET /signals"
upstream = "api"
cost = 1

[plans.bench]
default = true
{plan}"#
    )
}
