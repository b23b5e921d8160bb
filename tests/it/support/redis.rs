//! Private redis-server processes (their own port and data dir) that a test may stop, restart or
//! run as a Cluster, and a direct read of a key.

use super::{free_port, unique, TempDir};
use std::net::SocketAddr;
use std::time::Duration;

/// A private redis-server (its own port and data dir) that a test may stop and restart, for
/// outage tests that must not disturb the shared Redis.
pub struct PrivateRedis {
    pub addr: SocketAddr,
    dir: TempDir,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        let dir = TempDir(std::env::temp_dir().join(unique("tollgate-redis")));
        std::fs::create_dir_all(&dir.0).unwrap();
        let mut r = PrivateRedis {
            addr: free_port(),
            dir,
            child: None,
        };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Starts redis-server (loading the data saved at the last `shutdown_save`).
    pub async fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.addr.port().to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir.0)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
        wait_ping(&self.url()).await;
    }

    /// Saves to disk and stops (an outage that loses nothing).
    pub async fn shutdown_save(&mut self) {
        let c = redis::Client::open(self.url()).unwrap();
        let mut conn = c.get_multiplexed_async_connection().await.unwrap();
        let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN")
            .arg("SAVE")
            .query_async(&mut conn)
            .await;
        if let Some(mut child) = self.child.take() {
            child.wait().ok();
        }
    }

    /// Kills the server (SIGKILL): an outage that loses every key (nothing is persisted).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// `CLIENT PAUSE {ms} ALL`: every client's commands wait (a Redis that hangs, then recovers).
    pub async fn pause(&self, ms: u64) {
        let c = redis::Client::open(self.url()).unwrap();
        let mut conn = c.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(ms)
            .arg("ALL")
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    pub async fn get(&self, key: &str) -> Option<i64> {
        redis_get(&self.url(), key).await
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// A private three-node Redis Cluster (no replicas), torn down on drop.
pub struct PrivateCluster {
    pub ports: Vec<u16>,
    _dir: TempDir,
    children: Vec<std::process::Child>,
}

/// A port `p` such that `p` and its cluster bus port `p + 10000` are both free.
fn cluster_port() -> u16 {
    loop {
        let p = 20_000 + (uuid::Uuid::now_v7().as_u128() % 10_000) as u16;
        let ok = std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok();
        if ok {
            return p;
        }
    }
}

impl PrivateCluster {
    pub async fn start() -> PrivateCluster {
        let dir = TempDir(std::env::temp_dir().join(unique("tollgate-cluster")));
        let mut ports = Vec::new();
        let mut children = Vec::new();
        for _ in 0..3 {
            let p = cluster_port();
            let d = dir.0.join(p.to_string());
            std::fs::create_dir_all(&d).unwrap();
            let child = std::process::Command::new("redis-server")
                .args([
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    &p.to_string(),
                    "--cluster-enabled",
                    "yes",
                ])
                .args([
                    "--cluster-config-file",
                    "nodes.conf",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(&d)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server on PATH");
            ports.push(p);
            children.push(child);
        }
        let c = PrivateCluster {
            ports,
            _dir: dir,
            children,
        };
        for p in &c.ports {
            wait_ping(&format!("redis://127.0.0.1:{p}/")).await;
        }
        let nodes: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli on PATH");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for p in &c.ports {
            for _ in 0..200 {
                let info: String = node_cmd(*p, redis::cmd("CLUSTER").arg("INFO")).await;
                if info.contains("cluster_state:ok") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        c
    }

    /// Seed-node list for `storage.redis_url`.
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Keys held by each node, not counting reservation batch keys (`…:b:…`, which expire).
    pub async fn keys_per_node(&self) -> Vec<i64> {
        let mut v = Vec::new();
        for p in &self.ports {
            let keys: Vec<String> = node_cmd(*p, redis::cmd("KEYS").arg("*")).await;
            v.push(keys.iter().filter(|k| !k.contains(":b:")).count() as i64);
        }
        v
    }

    /// The longest time to live (ms) of any reservation batch key; `-1` when one never expires.
    pub async fn longest_batch_key_ttl(&self) -> i64 {
        let mut longest = 0;
        for p in &self.ports {
            let keys: Vec<String> = node_cmd(*p, redis::cmd("KEYS").arg("*")).await;
            for k in keys.iter().filter(|k| k.contains(":b:")) {
                let ttl: i64 = node_cmd(*p, redis::cmd("PTTL").arg(k)).await;
                if ttl < 0 {
                    return ttl;
                }
                longest = longest.max(ttl);
            }
        }
        longest
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

async fn wait_ping(url: &str) {
    for _ in 0..200 {
        if let Ok(c) = redis::Client::open(url) {
            if let Ok(mut conn) = c.get_multiplexed_async_connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("redis at {url} did not start");
}

async fn node_cmd<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> T {
    let c = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let mut conn = c.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}

/// `GET key` as an integer on the Redis at `url`.
pub async fn redis_get(url: &str, key: &str) -> Option<i64> {
    let c = redis::Client::open(url).unwrap();
    let mut conn = c.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}
