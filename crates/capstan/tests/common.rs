//! Helpers for end-to-end tests: a stack in a temp dir, driven by the real binary.

// Tests measure real time; the daemon reads it through state::clock.
#![allow(clippy::disallowed_methods)]
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn capstan_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_capstan"))
}

/// The demo service binary, built beside capstan (`cargo build --workspace`).
pub fn demo_bin() -> PathBuf {
    let p = capstan_bin().with_file_name("capstan-demo");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` first (scripts/test does)",
        p.display()
    );
    p
}

pub struct TestStack {
    pub dir: tempfile::TempDir,
    /// A unique value put in every replica's environment, to find its processes in /proc.
    pub marker: String,
}

impl TestStack {
    /// Writes `yaml` (with `{demo}` and `{marker}` substituted) as capstan.yaml.
    pub fn new(yaml: &str) -> TestStack {
        let dir = tempfile::tempdir().unwrap();
        let marker = format!(
            "t{}x{}",
            std::process::id(),
            dir.path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .replace('.', "")
        );
        let stack = TestStack { dir, marker };
        stack.write(yaml);
        stack
    }

    pub fn write(&self, yaml: &str) {
        let text = yaml
            .replace("{demo}", &demo_bin().display().to_string())
            .replace("{marker}", &self.marker);
        std::fs::write(self.file(), text).unwrap();
    }

    pub fn file(&self) -> PathBuf {
        self.dir.path().join("capstan.yaml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join(".capstan")
    }

    /// The daemon's API token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// Runs `capstan ARGS` in the stack's directory.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[])
    }

    /// Runs `capstan ARGS` with extra environment variables.
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(capstan_bin())
            .args(args)
            .envs(env.iter().copied())
            .current_dir(self.dir.path())
            .env("NO_COLOR", "1")
            .env_remove("CAPSTAN_DATA_DIR")
            .output()
            .unwrap()
    }

    /// Runs and expects success, returning stdout.
    /// Runs the CLI in a thread (a command that waits, such as a scale
    /// down that drains); its output when it is done.
    pub fn run_in_background(&self, args: &[&str]) -> std::thread::JoinHandle<Output> {
        let (bin, dir) = (capstan_bin(), self.dir.path().to_path_buf());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        std::thread::spawn(move || {
            Command::new(bin)
                .args(&args)
                .current_dir(dir)
                .output()
                .unwrap()
        })
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "capstan {args:?} failed: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn up(&self) -> String {
        self.ok(&[
            "up",
            "-d",
            "--listen",
            "127.0.0.1:0",
            "--wait-timeout",
            "60s",
        ])
    }

    /// `capstan up -d` that may fail (a replica that never gets ready, one
    /// that fails at once): the output, for the test to look at.
    pub fn up_unchecked(&self, wait_timeout: &str) -> Output {
        self.run(&[
            "up",
            "-d",
            "--listen",
            "127.0.0.1:0",
            "--wait-timeout",
            wait_timeout,
        ])
    }

    pub fn ps(&self) -> Vec<Value> {
        let out = self.ok(&["ps", "--output", "json"]);
        serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn replicas(&self, service: &str) -> Vec<Value> {
        self.ps()
            .into_iter()
            .filter(|r| r["service"] == service)
            .collect()
    }

    pub fn events(&self) -> Vec<Value> {
        let out = self.ok(&["events", "--output", "json"]);
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// GET on the daemon's API with the token; the JSON answer.
    pub fn api(&self, path: &str) -> Value {
        use std::io::{Read, Write};
        let info: Value =
            serde_json::from_slice(&std::fs::read(self.data_dir().join("daemon.json")).unwrap())
                .unwrap();
        let token = self.token();
        let mut c = std::net::TcpStream::connect(info["addr"].as_str().unwrap()).unwrap();
        write!(
            c,
            "GET {path} HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\r\n",
            token.trim()
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    pub fn daemon_pid(&self) -> i32 {
        let info: Value =
            serde_json::from_slice(&std::fs::read(self.data_dir().join("daemon.json")).unwrap())
                .unwrap();
        info["pid"].as_i64().unwrap() as i32
    }

    /// Pids of live processes that carry this stack's marker in their environment.
    pub fn marked_pids(&self) -> Vec<i32> {
        let needle = format!("CAPSTAN_TEST_MARKER={}", self.marker);
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            if !env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
                continue;
            }
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(") ")
                        .map(|(_, r)| r.chars().next().unwrap_or('?'))
                });
            if state.is_some_and(|c| c != 'Z') {
                out.push(pid);
            }
        }
        out.sort();
        out
    }

    /// Every stored log line of a service, one per line: through the API while
    /// the daemon runs, else read from the log store itself.
    pub fn stored_logs(&self, service: &str) -> String {
        let out = self.run(&["logs", service, "--output", "json"]);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter_map(|v| v["line"].as_str().map(str::to_owned))
                .collect::<Vec<_>>()
                .join("\n");
        }
        let (store, _) = capstan_logstore::Store::open(capstan_logstore::Options::new(
            self.data_dir().join("logstore"),
        ))
        .expect("the log store opens");
        let q = capstan_logstore::Query {
            from_ns: i64::MIN,
            to_ns: i64::MAX,
            streams: &|l| l.get("service") == Some(service),
            contains: &[],
            after_seq: 0,
            meta: &[],
        };
        store
            .select(&q, capstan_logstore::Direction::Forward, usize::MAX)
            .expect("the log store reads")
            .into_iter()
            .map(|(_, e)| e.line)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A `capstan … -f` process whose JSON lines are collected until one matches.
pub struct Follower {
    child: std::process::Child,
    reader: std::thread::JoinHandle<Vec<Value>>,
}

impl Follower {
    /// Waits until the awaited line came (or panics after `timeout`), stops the process
    /// and returns every line read.
    pub fn finish(mut self, what: &str, timeout: Duration) -> Vec<Value> {
        wait_for(what, timeout, || self.reader.is_finished().then_some(()));
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reader.join().unwrap()
    }
}

impl TestStack {
    /// Starts `capstan ARGS` (a following command with JSON output) and reads its
    /// lines until `last` returns true for one.
    pub fn follow(
        &self,
        args: &[&str],
        last: impl Fn(&Value) -> bool + Send + 'static,
    ) -> Follower {
        let mut child = Command::new(capstan_bin())
            .args(args)
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            let mut lines = Vec::new();
            for line in std::io::BufReader::new(stdout).lines() {
                let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
                let done = last(&v);
                lines.push(v);
                if done {
                    break;
                }
            }
            lines
        });
        Follower { child, reader }
    }
}

impl Drop for TestStack {
    fn drop(&mut self) {
        // Best effort: stop the daemon and anything left, even when a test failed.
        let _ = self.run(&["down"]);
        for pid in self.marked_pids() {
            sigkill(pid);
        }
    }
}

/// `capstan load URL --rate RATE -d SECS -o json` in a thread; its report.
pub fn load_in_background(
    url: String,
    rate: u32,
    secs: u32,
) -> std::thread::JoinHandle<serde_json::Value> {
    std::thread::spawn(move || {
        let out = Command::new(capstan_bin())
            .args(["load", &url, "--rate", &rate.to_string()])
            .args(["-d", &format!("{secs}s"), "-o", "json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    })
}

/// Polls `f` until it returns Some, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn sigkill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .map(|(_, r)| r.starts_with(|c| c != 'Z'))
        })
        .unwrap_or(false)
}

pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// A child process killed when dropped.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn need(bin: &str) -> String {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = format!("{dir}/{bin}");
        if std::path::Path::new(&p).exists() {
            return p;
        }
    }
    panic!(
        "{bin} is not installed: run scripts/test, which installs what the tests need (prometheus, docker-registry, podman, …)"
    );
}

/// A real node_exporter with a few collectors, on a free loopback port.
pub fn start_node_exporter(bin: &str) -> (Killed, u16) {
    let port = free_port();
    let child = std::process::Command::new(bin)
        .args([
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--collector.disable-defaults".into(),
            "--collector.cpu".into(),
            "--collector.loadavg".into(),
            "--collector.meminfo".into(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (Killed(child), port)
}

/// A real Prometheus with `config` (prometheus.yml text) on loopback `port`;
/// returns the process, its address and its directory.
pub fn start_prometheus(config: &str, port: u16) -> (Killed, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let k = start_prometheus_in(config, port, &[], dir.path());
    (k, format!("127.0.0.1:{port}"), dir)
}

/// A real Prometheus with its config and data in `dir` (kept across restarts)
/// and extra flags.
pub fn start_prometheus_in(
    config: &str,
    port: u16,
    args: &[&str],
    dir: &std::path::Path,
) -> Killed {
    let bin = need("prometheus");
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let child = std::process::Command::new(bin)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Killed(child)
}

/// GET `path` on `addr` without a token; the status code and the body.
pub fn http_fetch(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(c, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let code = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (code, body.to_owned())
}

/// The daemon's address, from daemon.json.
pub fn daemon_addr(s: &TestStack) -> String {
    let info: Value =
        serde_json::from_slice(&std::fs::read(s.data_dir().join("daemon.json")).unwrap()).unwrap();
    info["addr"].as_str().unwrap().to_owned()
}

/// prometheus.yml text: scrape `jobs` (name, target address) every second and
/// remote-write every sample to capstan at `addr` with the token in `token_file`.
pub fn remote_writing_config(
    jobs: &[(&str, String)],
    addr: &str,
    token_file: &std::path::Path,
) -> String {
    let mut c = String::from("global:\n  scrape_interval: 1s\nscrape_configs:\n");
    for (job, target) in jobs {
        c.push_str(&format!(
            "  - job_name: {job}\n    static_configs: [{{targets: [\"{target}\"]}}]\n"
        ));
    }
    c.push_str(&format!(
        "remote_write:\n  - url: http://{addr}/api/v1/write\n    authorization: {{credentials_file: {}}}\n    queue_config: {{batch_send_deadline: 1s, min_backoff: 100ms, max_backoff: 1s}}\n",
        token_file.display()
    ));
    c
}

/// POST `body` to `path` on `addr` with extra headers; the status code and the body.
pub fn http_post(addr: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    c.write_all(req.as_bytes()).unwrap();
    // The server may answer (413) before reading a large body.
    let _ = c.write_all(body);
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let code = std::str::from_utf8(out.get(9..12).unwrap_or(b""))
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let at = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |p| p + 4);
    (code, out[at..].to_vec())
}

/// A stack of one quiet demo service, for tests about what is pushed to capstan.
pub const QUIET_STACK: &str = r#"
services:
  quiet:
    command: ["{demo}"]
    environment: {CAPSTAN_TEST_MARKER: "{marker}"}
    x-capstan:
      metrics: {disable: true}
      proxy: {access_log: false}
"#;

/// Percent-encodes a query parameter's value.
pub fn enc(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Where in `events` those of `kind` about a replica of revision `rev` are.
pub fn event_positions(events: &[Value], kind: &str, rev: u64) -> Vec<usize> {
    events
        .iter()
        .enumerate()
        .filter(|(_, e)| e["kind"] == kind && e["revision"] == rev)
        .map(|(i, _)| i)
        .collect()
}

/// The python3 on PATH: the one scripts/test installed the test packages into.
pub fn python() -> String {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("python3"))
                .find(|p| p.exists())
        })
        .expect("python3 on PATH")
        .display()
        .to_string()
}

/// Whether a Docker Engine answers.
pub fn engine() -> Result<(), String> {
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "no Docker Engine answers: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("no docker command: {e}")),
    }
}

/// The demo service as an image built here (`FROM scratch`: its binary and
/// the shared libraries it links), once per test binary; its tag, or none
/// without a Docker Engine.
pub fn demo_image() -> Option<&'static str> {
    static IMAGE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    IMAGE
        .get_or_init(|| {
            if let Err(why) = engine() {
                eprintln!("skipped: {why}");
                return None;
            }
            let ctx = tempfile::tempdir().unwrap();
            let bin = demo_bin();
            std::fs::copy(&bin, ctx.path().join("capstan-demo")).unwrap();
            // The binary's shared libraries, at the paths the loader wants.
            let ldd = Command::new("ldd").arg(&bin).output().unwrap();
            for line in String::from_utf8_lossy(&ldd.stdout).lines() {
                let path = line
                    .split_whitespace()
                    .find(|w| w.starts_with('/'))
                    .map(std::path::PathBuf::from);
                if let Some(p) = path {
                    let dest = ctx.path().join("root").join(p.strip_prefix("/").unwrap());
                    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
                    std::fs::copy(std::fs::canonicalize(&p).unwrap(), &dest).unwrap();
                }
            }
            std::fs::write(
                ctx.path().join("Dockerfile"),
                "FROM scratch\nCOPY root/ /\nCOPY capstan-demo /capstan-demo\nENV HOST=0.0.0.0\nEXPOSE 8080\nENTRYPOINT [\"/capstan-demo\"]\n",
            )
            .unwrap();
            let tag = "capstan-demo:test".to_owned();
            let out = Command::new("docker")
                .args(["build", "-q", "-t", &tag])
                .arg(ctx.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "docker build: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(tag)
        })
        .as_deref()
}

/// The wall clock in unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Debian's docker-registry serving `config` (which names `port` on loopback),
/// once it accepts connections.
pub fn start_registry(config: &std::path::Path, port: u16) -> Killed {
    let registry = need("docker-registry");
    let k = Killed(
        Command::new(registry)
            .arg("serve")
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the registry", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    k
}
