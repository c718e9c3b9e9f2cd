//! The container driver against the machine's real Docker Engine: the demo
//! service as an image built here (`FROM scratch`: its binary and the shared
//! libraries it needs), run through capstan's proxy, logs, metrics and
//! supervision. Skipped, with the reason, where no engine answers.

// Tests measure real time; the daemon reads it through state::clock.
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// The engine answers `docker info`, or why not.
/// The ids of a test stack's containers.
fn container_ids(marker: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label=capstan.test={marker}"),
        ])
        .output()
        .unwrap();
    let mut ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    ids.sort();
    ids
}

/// Containers (and networks) of a test stack, found by its marker label.
fn containers(marker: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label=capstan.test={marker}"),
            "--format",
            "{{.Names}}",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn networks(stack: &TestStack) -> Vec<String> {
    let out = Command::new("docker")
        .args(["network", "ls", "--format", "{{.Name}}"])
        .output()
        .unwrap();
    let name = stack
        .dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_lowercase();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|n| n.starts_with("capstan-") && n.contains(&name.replace('.', "")))
        .map(str::to_owned)
        .collect()
}

/// Removes what a failed test left in the engine.
struct Leftovers(String);

impl Drop for Leftovers {
    fn drop(&mut self) {
        for c in containers(&self.0) {
            let _ = Command::new("docker").args(["rm", "-f", &c]).output();
        }
    }
}

fn stack(image: &str, port: u16, replicas: u32) -> (TestStack, Leftovers) {
    stack_with(image, port, replicas, "")
}

fn stack_with(image: &str, port: u16, replicas: u32, extra: &str) -> (TestStack, Leftovers) {
    let s = TestStack::new(&format!(
        r#"
x-capstan:
  scrape_interval: 1s
services:
  web:
    image: {image}
    environment: {{VERSION: "c1"}}
    labels: {{capstan.test: "{{marker}}"}}
    ports: ["127.0.0.1:{port}:8080"]
    stop_grace_period: 5s
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s}}
    deploy:
      replicas: {replicas}
      resources: {{limits: {{memory: 64m, cpus: "0.5"}}}}
{extra}"#
    ));
    let guard = Leftovers(s.marker.clone());
    (s, guard)
}

fn healthy(s: &TestStack) -> usize {
    s.replicas("web")
        .iter()
        .filter(|r| r["health"] == "healthy")
        .count()
}

#[test]
fn image_services_run_as_containers_behind_the_proxy() {
    let Some(image) = demo_image() else { return };
    let port = free_port();
    let (s, _guard) = stack(image, port, 2);
    s.up();
    assert_eq!(healthy(&s), 2, "{:?}", s.replicas("web"));
    assert_eq!(containers(&s.marker).len(), 2);
    assert_eq!(networks(&s).len(), 1, "one network for the stack");
    // Through the proxy, both replicas answer.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let resp = http_get(port, "/").unwrap();
        let body = resp.lines().last().unwrap_or("").to_owned();
        assert!(body.starts_with("hello from web version c1"), "{resp}");
        seen.insert(body);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    // Their output is in the log store, their resources in the metrics.
    let logs = s.ok(&["logs", "web"]);
    assert!(logs.contains("\"msg\":\"listening\""), "{logs}");
    wait_for("container memory series", Duration::from_secs(20), || {
        let out = s.ok(&[
            "query",
            "container_memory_working_set_bytes{service=\"web\"}",
        ]);
        (out.lines()
            .filter(|l| l.contains("container_memory"))
            .count()
            == 2)
            .then_some(())
    });
    for r in s.replicas("web") {
        assert!(r["pid"].as_i64().unwrap() > 0, "{r}");
    }
    proxy_span_in_trace(&s, port, "web");
    s.ok(&["down"]);
    assert!(containers(&s.marker).is_empty());
    assert!(networks(&s).is_empty(), "the stack's network is removed");
}

/// A sampled request through the proxy leaves the proxy's span in its trace.
fn proxy_span_in_trace(s: &TestStack, port: u16, host: &str) {
    let tid = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(
        &mut conn,
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\ntraceparent: 00-{tid}-00f067aa0ba902b7-01\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut conn, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let addr = daemon_addr(s);
    wait_for("the proxy's span", Duration::from_secs(10), || {
        let (code, body) = http_fetch(&addr, &format!("/api/traces/{tid}"));
        (code == 200 && body.contains("capstan.proxy")).then_some(())
    });
}

#[test]
fn a_killed_daemons_containers_are_adopted_and_their_logs_go_on() {
    let Some(image) = demo_image() else { return };
    let port = free_port();
    let (s, _guard) = stack(image, port, 2);
    s.up();
    let before = container_ids(&s.marker);
    assert_eq!(before.len(), 2);
    // Some output before the kill.
    for _ in 0..5 {
        assert!(http_get(port, "/").is_some());
    }
    std::thread::sleep(Duration::from_millis(1500));
    sigkill(s.daemon_pid());
    std::thread::sleep(Duration::from_millis(300));
    // Output while no daemon runs.
    assert_eq!(
        container_ids(&s.marker),
        before,
        "the containers outlive the daemon"
    );
    // The next `up` takes them over: same containers, serving through the proxy.
    s.up();
    assert_eq!(healthy(&s), 2);
    assert_eq!(container_ids(&s.marker), before, "adopted, not replaced");
    let events = s.events();
    assert_eq!(
        events.iter().filter(|e| e["kind"] == "adopted").count(),
        2,
        "{events:?}"
    );
    for _ in 0..5 {
        assert!(http_get(port, "/").is_some());
    }
    // Each container said `listening` once: the logs go on without repeats.
    wait_for("the new requests' lines", Duration::from_secs(10), || {
        let logs = s.ok(&["logs", "web"]);
        (logs.matches("\"path\":\"/\"").count() >= 10).then_some(())
    });
    let logs = s.ok(&["logs", "web"]);
    assert_eq!(logs.matches("\"msg\":\"listening\"").count(), 2, "{logs}");
    assert_eq!(logs.matches("\"path\":\"/\"").count(), 10, "{logs}");
    // A changed definition is not adopted: those containers are replaced.
    sigkill(s.daemon_pid());
    std::thread::sleep(Duration::from_millis(300));
    s.write(
        &std::fs::read_to_string(s.file())
            .unwrap()
            .replace("VERSION: \"c1\"", "VERSION: \"c2\""),
    );
    s.up();
    let replaced = container_ids(&s.marker);
    assert_eq!(replaced.len(), 2);
    assert!(replaced.iter().all(|c| !before.contains(c)), "{replaced:?}");
    assert!(http_get(port, "/").unwrap().contains("version c2"));
    s.ok(&["down"]);
    assert!(containers(&s.marker).is_empty());
}

#[test]
fn a_missing_image_is_named_in_the_error() {
    if let Err(why) = engine() {
        eprintln!("skipped: {why}");
        return;
    }
    let (s, _guard) = stack("capstan-test-missing:nope", free_port(), 1);
    // `up` pulls before anything starts, and stops there, naming the image
    // and the registry.
    let out = s.up_unchecked("20s");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("web: cannot pull image capstan-test-missing:nope from registry docker.io"),
        "{err}"
    );
    assert!(!s.run(&["ps"]).status.success(), "no daemon was started");
    // With `pull_policy: never`, a missing image is not even asked for.
    let (s, _guard) = stack_with(
        "capstan-test-missing:nope\n    pull_policy: never",
        free_port(),
        1,
        "",
    );
    let out = s.up_unchecked("20s");
    assert!(!out.status.success());
    wait_for("the refusal", Duration::from_secs(20), || {
        s.events().into_iter().find(|e| {
            e["reason"].as_str().is_some_and(|r| {
                r.contains("image capstan-test-missing:nope is not on this engine and pull_policy is never")
            })
        })
    });
}

#[test]
fn scaling_containers_under_load_fails_no_request() {
    let Some(image) = demo_image() else { return };
    let port = free_port();
    let (s, _guard) = stack(image, port, 1);
    s.up();
    let load = load_in_background(format!("http://127.0.0.1:{port}/"), 200, 8);
    std::thread::sleep(Duration::from_secs(1));
    s.ok(&["scale", "web=5"]);
    wait_for("five healthy", Duration::from_secs(30), || {
        (healthy(&s) == 5).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    s.ok(&["scale", "web=1"]);
    let v = load.join().unwrap();
    let n = v["requests"].as_u64().unwrap();
    assert!(n >= 1000, "{v}");
    assert_eq!(v["status"]["200"].as_u64(), Some(n), "{v}");
    assert_eq!(containers(&s.marker).len(), 1);
    s.ok(&["down"]);
}

#[test]
fn a_killed_container_under_load_fails_no_request_and_restarts() {
    let Some(image) = demo_image() else { return };
    let port = free_port();
    let (s, _guard) = stack_with(
        image,
        port,
        2,
        "      restart_policy: {condition: any, delay: 200ms}\n",
    );
    s.up();
    let load = load_in_background(format!("http://127.0.0.1:{port}/"), 200, 6);
    std::thread::sleep(Duration::from_secs(2));
    let victim = containers(&s.marker).into_iter().next().unwrap();
    let out = Command::new("docker")
        .args(["kill", &victim])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v = load.join().unwrap();
    let n = v["requests"].as_u64().unwrap();
    assert!(n >= 1000, "{v}");
    assert_eq!(v["status"]["200"].as_u64(), Some(n), "{v}");
    wait_for("the killed replica back", Duration::from_secs(20), || {
        let r = s.replicas("web");
        (healthy(&s) == 2 && r.iter().any(|r| r["restarts"] == 1)).then_some(())
    });
    let events = s.events();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "exited" && e["reason"].as_str().unwrap().contains("code 137")),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e["kind"] == "restarting"),
        "{events:?}"
    );
    s.ok(&["down"]);
}

#[test]
fn a_container_over_its_memory_limit_is_reported_oom_killed() {
    let Some(image) = demo_image() else { return };
    let port = free_port();
    let (s, _guard) = stack(image, port, 1);
    s.up();
    // 64 MiB limit; the demo holds what /alloc asks for.
    let _ = http_fetch(&format!("127.0.0.1:{port}"), "/alloc?mb=200");
    // The demo writes it in one go: the kernel kills within a second or
    // so (a slow climb had it reclaim the program's code pages for minutes).
    wait_for("an oom-killed event", Duration::from_secs(60), || {
        s.events().into_iter().find(|e| e["kind"] == "oom-killed")
    });
    s.ok(&["down"]);
}

#[test]
fn a_build_service_is_built_per_revision_and_runs() {
    let Some(image) = demo_image() else { return };
    let port = free_port();
    let s = TestStack::new(&format!(
        r#"
services:
  web:
    build:
      context: ./web
      args: {{GREETING: built}}
    labels: {{capstan.test: "{{marker}}"}}
    ports: ["127.0.0.1:{port}:8080"]
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s}}
    deploy: {{replicas: 2}}
"#
    ));
    let _guard = Leftovers(s.marker.clone());
    let ctx = s.dir.path().join("web");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {image}\nARG GREETING\nENV VERSION=$GREETING\nCOPY . /ctx/\n"),
    )
    .unwrap();
    std::fs::write(ctx.join("app.txt"), "v1").unwrap();
    std::fs::write(ctx.join("secret.txt"), "not for the image").unwrap();
    std::fs::write(ctx.join(".dockerignore"), "secret.txt\n").unwrap();
    // `up` builds first and shows the build's output as it goes.
    let out = s.up();
    assert!(out.contains("web: Step 1/4 : FROM"), "{out}");
    assert!(out.contains("web: built "), "{out}");
    let resp = http_get(port, "/").unwrap();
    assert!(resp.contains("hello from web version built"), "{resp}");
    let revisions = |s: &TestStack| -> Vec<String> {
        s.replicas("web")
            .iter()
            .map(|r| r["revision"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(revisions(&s), ["1", "1"]);
    // The image holds the context without what .dockerignore leaves out.
    let name = containers(&s.marker).pop().unwrap();
    let has = |path: &str| {
        Command::new("docker")
            .args(["cp", &format!("{name}:{path}"), "-"])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(has("/ctx/app.txt") && !has("/ctx/secret.txt"));
    // Built once, by the CLI: the daemon only names it for the revision.
    let events = s.events();
    let builds = events.iter().filter(|e| e["kind"] == "building").count();
    assert_eq!(builds, 0, "{events:?}");
    // Unchanged, `up` builds from the cache to the same image: nothing to do.
    s.up();
    assert_eq!(revisions(&s), ["1", "1"]);
    // Changed code is a new image, so a new revision, rolled out.
    std::fs::write(ctx.join("app.txt"), "v2").unwrap();
    s.up();
    wait_for("revision 2 everywhere", Duration::from_secs(60), || {
        (revisions(&s) == ["2", "2"]).then_some(())
    });
    s.ok(&["down"]);
}

#[test]
fn a_cmd_health_check_runs_inside_the_container() {
    let Some(image) = demo_image() else { return };
    let port = free_port();
    let s = TestStack::new(&format!(
        r#"
services:
  web:
    image: {image}
    labels: {{capstan.test: "{{marker}}"}}
    ports: ["127.0.0.1:{port}:8080"]
    healthcheck:
      test: ["CMD", "/capstan-demo", "check"]
      interval: 1s
      retries: 2
  broken:
    image: {image}
    labels: {{capstan.test: "{{marker}}"}}
    healthcheck:
      test: ["CMD", "/capstan-demo", "check", "/missing"]
      interval: 500ms
      retries: 2
      start_period: 0s
"#
    ));
    let _guard = Leftovers(s.marker.clone());
    let _ = s.up_unchecked("20s");
    wait_for(
        "web healthy, broken unhealthy",
        Duration::from_secs(20),
        || {
            let web = s.replicas("web");
            let broken = s.replicas("broken");
            (web.first().is_some_and(|r| r["health"] == "healthy")
                && s.events()
                    .iter()
                    .any(|e| e["kind"] == "unhealthy" && e["service"] == "broken"))
            .then_some(broken)
        },
    );
    let resp = http_get(port, "/").unwrap();
    assert!(resp.contains("hello from web"), "{resp}");
    s.ok(&["down"]);
}

fn docker_out(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn volumes_are_mounted_kept_by_down_and_removed_by_down_volumes() {
    let Some(image) = demo_image() else { return };
    let s = TestStack::new(&format!(
        r#"
services:
  db:
    image: {image}
    labels: {{capstan.test: "{{marker}}"}}
    volumes:
      - data:/var/lib/data
      - ./conf:/etc/conf:ro
      - type: tmpfs
        target: /tmp
volumes:
  data:
"#
    ));
    let _guard = Leftovers(s.marker.clone());
    std::fs::create_dir_all(s.dir.path().join("conf")).unwrap();
    s.up();
    let name = containers(&s.marker).pop().unwrap();
    let mounts = docker_out(&["inspect", "--format", "{{json .Mounts}}", &name]);
    let mounts: serde_json::Value = serde_json::from_str(&mounts).unwrap();
    let by_dest = |d: &str| {
        mounts
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["Destination"] == d)
            .cloned()
            .unwrap_or_else(|| panic!("no mount at {d}: {mounts}"))
    };
    let data = by_dest("/var/lib/data");
    assert_eq!(data["Type"], "volume");
    let volume = data["Name"].as_str().unwrap().to_owned();
    assert!(
        volume.starts_with("capstan-") && volume.ends_with("-data"),
        "{volume}"
    );
    let conf = by_dest("/etc/conf");
    assert_eq!(conf["Type"], "bind");
    assert_eq!(conf["RW"], false);
    assert_eq!(
        conf["Source"].as_str().unwrap(),
        s.dir.path().join("conf").to_str().unwrap()
    );
    // `down` keeps the named volume, as compose's does; `down -v` removes it.
    s.ok(&["down"]);
    assert!(
        docker_out(&["volume", "ls", "-q"])
            .lines()
            .any(|v| v == volume)
    );
    s.up();
    s.ok(&["down", "--volumes"]);
    assert!(
        !docker_out(&["volume", "ls", "-q"])
            .lines()
            .any(|v| v == volume)
    );
}

#[test]
fn container_keys_reach_the_engine() {
    let Some(image) = demo_image() else { return };
    let udp = free_port();
    let s = TestStack::new(&format!(
        r#"
services:
  box:
    image: {image}
    labels: {{capstan.test: "{{marker}}"}}
    user: "1000:1000"
    ports: ["127.0.0.1:{udp}:53/udp"]
    hostname: boxy
    init: true
    read_only: true
    cap_drop: [ALL]
    cap_add: [NET_BIND_SERVICE]
    extra_hosts: ["db.internal:10.1.2.3"]
    ulimits:
      nofile: {{soft: 1024, hard: 2048}}
      nproc: 512
    tmpfs: ["/scratch:size=1m"]
    shm_size: 16m
    sysctls: {{net.core.somaxconn: "1024"}}
    security_opt: [no-new-privileges:true]
    dns: 10.9.8.7
    group_add: ["2000"]
    mem_reservation: 32m
    cpu_shares: 512
"#
    ));
    let _guard = Leftovers(s.marker.clone());
    s.up();
    let name = containers(&s.marker).pop().unwrap();
    let v: serde_json::Value = serde_json::from_str(&docker_out(&["inspect", &name])).unwrap();
    let c = &v[0];
    assert_eq!(c["Config"]["User"], "1000:1000");
    assert_eq!(c["Config"]["Hostname"], "boxy");
    assert_eq!(c["HostConfig"]["Init"], true);
    assert_eq!(c["HostConfig"]["ReadonlyRootfs"], true);
    assert_eq!(c["HostConfig"]["CapDrop"], serde_json::json!(["ALL"]));
    assert_eq!(
        c["HostConfig"]["CapAdd"],
        serde_json::json!(["NET_BIND_SERVICE"])
    );
    assert_eq!(
        c["HostConfig"]["ExtraHosts"],
        serde_json::json!(["db.internal:10.1.2.3", "host.docker.internal:host-gateway"])
    );
    let h = &c["HostConfig"];
    assert_eq!(
        h["Ulimits"],
        serde_json::json!([{"Name": "nofile", "Soft": 1024, "Hard": 2048}, {"Name": "nproc", "Soft": 512, "Hard": 512}])
    );
    assert_eq!(h["Tmpfs"], serde_json::json!({"/scratch": "size=1m"}));
    assert_eq!(h["ShmSize"], 16 << 20);
    assert_eq!(
        h["Sysctls"],
        serde_json::json!({"net.core.somaxconn": "1024"})
    );
    assert_eq!(
        h["SecurityOpt"],
        serde_json::json!(["no-new-privileges:true"])
    );
    assert_eq!(h["Dns"], serde_json::json!(["10.9.8.7"]));
    assert_eq!(h["GroupAdd"], serde_json::json!(["2000"]));
    assert_eq!(h["MemoryReservation"], 32 << 20);
    assert_eq!(h["CpuShares"], 512);
    // A UDP port is the engine's to publish.
    let bound = &c["HostConfig"]["PortBindings"]["53/udp"][0];
    assert_eq!(bound["HostIp"], "127.0.0.1");
    assert_eq!(bound["HostPort"], udp.to_string());
    let policy = c["HostConfig"]["RestartPolicy"]["Name"].as_str().unwrap();
    assert!(
        matches!(policy, "" | "no"),
        "capstan restarts, not the engine: {policy}"
    );
    s.ok(&["down"]);
}

#[test]
fn an_image_missing_locally_is_pulled_from_a_registry_with_credentials() {
    let Some(image) = demo_image() else { return };
    // A real registry (Debian's docker-registry) on a loopback port, with a
    // password file.
    let htpasswd = need("htpasswd");
    let port = free_port();
    let store = tempfile::tempdir().unwrap();
    let users = store.path().join("htpasswd");
    let out = Command::new(htpasswd)
        .args(["-Bbn", "alice", "s3cret"])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(&users, &out.stdout).unwrap();
    let config = store.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: capstan-test\n    path: {}\n",
            store.path().join("data").display(),
            users.display()
        ),
    )
    .unwrap();
    let _registry = start_registry(&config, port);
    // The Docker CLI's own login writes the config capstan reads.
    let logged_in = store.path().join("docker-config");
    let nobody = store.path().join("no-config");
    std::fs::create_dir_all(&nobody).unwrap();
    let s = TestStack::new("services: {}\n");
    let tag = format!("127.0.0.1:{port}/capstan-demo:{}", s.marker.to_lowercase());
    let cfg = logged_in.to_str().unwrap();
    let host = format!("127.0.0.1:{port}");
    // A layer of its own, so that the pull has one to fetch.
    let ctx = store.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {image}\nCOPY marker /marker\n"),
    )
    .unwrap();
    std::fs::write(ctx.join("marker"), &s.marker).unwrap();
    for args in [
        vec![
            "--config",
            cfg,
            "login",
            "-u",
            "alice",
            "-p",
            "s3cret",
            host.as_str(),
        ],
        vec!["build", "-q", "-t", tag.as_str(), ctx.to_str().unwrap()],
        vec!["--config", cfg, "push", tag.as_str()],
        vec!["rmi", tag.as_str()],
    ] {
        let out = Command::new("docker").args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(docker_out(&["images", "-q", &tag]).trim().is_empty());
    let web_port = free_port();
    s.write(&format!(
        r#"
services:
  web:
    image: {tag}
    labels: {{capstan.test: "{{marker}}"}}
    ports: ["127.0.0.1:{web_port}:8080"]
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s}}
"#
    ));
    let _guard = Leftovers(s.marker.clone());
    let up = [
        "up",
        "-d",
        "--listen",
        "127.0.0.1:0",
        "--wait-timeout",
        "60s",
    ];
    // Without credentials the registry refuses, and the error says which
    // image and which registry.
    let out = s.run_env(&up, &[("DOCKER_CONFIG", nobody.to_str().unwrap())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("cannot pull image {tag} from registry {host}")),
        "{err}"
    );
    // With the login's config, `up` pulls, showing each layer, then starts.
    let out = s.run_env(&up, &[("DOCKER_CONFIG", cfg)]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains(&format!("web: pulling {tag}")), "{said}");
    assert!(said.contains(": Pull complete"), "{said}");
    assert!(said.contains(&format!("web: pulled {tag}")), "{said}");
    assert!(http_get(web_port, "/").unwrap().contains("hello from web"));
    // An image gone later is pulled by the daemon itself, with the same
    // credentials.
    docker_out(&["rmi", "-f", &tag]);
    s.ok(&["scale", "web=2"]);
    wait_for("two healthy replicas", Duration::from_secs(60), || {
        (healthy(&s) == 2).then_some(())
    });
    let events = s.events();
    let said = |kind: &str| {
        events
            .iter()
            .any(|e| e["kind"] == kind && e["reason"].as_str().unwrap().contains(&tag))
    };
    assert!(said("pulling") && said("pulled"), "{events:?}");
    s.ok(&["down"]);
    let _ = Command::new("docker").args(["rmi", &tag]).output();
}

/// The host's address on the engine's default bridge, which `host-gateway`
/// names (docker0's address).
fn bridge_gateway() -> String {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "docker0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no address on docker0: {text}"))
        .to_owned()
}

#[test]
fn processes_and_containers_reach_each_other() {
    let Some(image) = demo_image() else { return };
    let (api_port, web_port) = (free_port(), free_port());
    // The process service publishes on the bridge's gateway (the host as
    // containers see it), not beyond the machine.
    let gateway = bridge_gateway();
    let s = TestStack::new(&format!(
        r#"
services:
  api:
    command: ["{{demo}}"]
    environment: {{CAPSTAN_TEST_MARKER: "{{marker}}", LOG_REQUESTS: "0"}}
    ports: ["{gateway}:{api_port}:http"]
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s}}
  web:
    image: {image}
    labels: {{capstan.test: "{{marker}}"}}
    ports: ["127.0.0.1:{web_port}:8080"]
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s}}
  db:
    image: {image}
    labels: {{capstan.test: "{{marker}}"}}
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s}}
"#
    ));
    let _guard = Leftovers(s.marker.clone());
    s.up();
    let fetch = |port: u16, url: &str| -> String {
        let (code, body) = http_fetch(&format!("127.0.0.1:{port}"), &format!("/fetch?url={url}"));
        assert_eq!(code, 200, "{url}: {body}");
        body
    };
    // A container reaches a process service by its name, through the proxy.
    let body = fetch(web_port, &format!("http://api:{api_port}/"));
    assert!(body.contains("hello from api"), "{body}");
    // A container reaches another container service by its name.
    let body = fetch(web_port, "http://db:8080/");
    assert!(body.contains("hello from db"), "{body}");
    // A process reaches a container service at its published port.
    let (code, body) = http_fetch(
        &format!("{gateway}:{api_port}"),
        &format!("/fetch?url=http://127.0.0.1:{web_port}/"),
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("hello from web"), "{body}");
    s.ok(&["down"]);
}

#[test]
fn declared_networks_isolate_services_and_give_aliases() {
    let Some(image) = demo_image() else { return };
    let (web_port, other_port) = (free_port(), free_port());
    let s = TestStack::new(&format!(
        r#"
x-demo: &demo
  image: {image}
  labels: {{capstan.test: "{{marker}}"}}
  x-capstan:
    healthcheck: {{http: /healthz, interval: 1s}}
services:
  web:
    <<: *demo
    ports: ["127.0.0.1:{web_port}:8080"]
    networks:
      front: {{aliases: [www]}}
      back:
  db:
    <<: *demo
    networks:
      back: {{aliases: [database]}}
  other:
    <<: *demo
    ports: ["127.0.0.1:{other_port}:8080"]
    networks: [front]
networks:
  front:
  back:
    internal: true
    labels: {{tier: data}}
"#
    ));
    let _guard = Leftovers(s.marker.clone());
    s.up();
    let fetch = |port: u16, url: &str| {
        http_fetch(&format!("127.0.0.1:{port}"), &format!("/fetch?url={url}"))
    };
    // web is on both networks: it reaches db by name and by its alias.
    for url in ["http://db:8080/", "http://database:8080/"] {
        let (code, body) = fetch(web_port, url);
        assert_eq!(code, 200, "{url}: {body}");
        assert!(body.contains("hello from db"), "{body}");
    }
    // other shares only `front` with web: it reaches web by its alias there,
    // and not db at all.
    let (code, body) = fetch(other_port, "http://www:8080/");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("hello from web"), "{body}");
    let (code, body) = fetch(other_port, "http://db:8080/");
    assert_ne!(code, 200, "db must not be reachable from other: {body}");
    let nets = networks(&s);
    assert_eq!(nets.len(), 2, "{nets:?}");
    let back = nets
        .iter()
        .find(|n| n.ends_with("-back"))
        .expect("the back network");
    let v: serde_json::Value =
        serde_json::from_str(&docker_out(&["network", "inspect", back])).unwrap();
    assert_eq!(v[0]["Internal"], true);
    assert_eq!(v[0]["Labels"]["tier"], "data");
    s.ok(&["down"]);
    assert!(networks(&s).is_empty(), "{:?}", networks(&s));
}

#[test]
fn secrets_and_configs_appear_as_files() {
    let Some(image) = demo_image() else { return };
    let s = TestStack::new(&format!(
        r#"
services:
  app:
    image: {image}
    labels: {{capstan.test: "{{marker}}"}}
    secrets:
      - api_key
      - source: token
        target: token.txt
        mode: 0400
        uid: "1000"
    configs:
      - source: app_conf
        target: /etc/app.conf
        mode: 0440
secrets:
  api_key: {{file: ./api_key.txt}}
  token: {{environment: CAPSTAN_TEST_TOKEN}}
configs:
  app_conf: {{content: "listen = 8080"}}
"#
    ));
    std::fs::write(s.dir.path().join("api_key.txt"), "k-123\n").unwrap();
    let _guard = Leftovers(s.marker.clone());
    let out = s.run_env(
        &["up", "-d", "--listen", "127.0.0.1:0"],
        &[("CAPSTAN_TEST_TOKEN", "t-456")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let name = containers(&s.marker).pop().unwrap();
    // `docker cp` works on an image without a shell; the listing gives the
    // mode and owner.
    let sh = |cmd: String| -> String {
        let out = Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let read = |path: &str| -> (String, String) {
        (
            sh(format!("docker cp {name}:{path} - | tar -xOf -")),
            sh(format!("docker cp {name}:{path} - | tar -tvf -")),
        )
    };
    let (key, _) = read("/run/secrets/api_key");
    assert_eq!(key, "k-123\n");
    let (token, listing) = read("/run/secrets/token.txt");
    assert_eq!(token, "t-456");
    assert!(listing.starts_with("-r-------- 1000/"), "{listing}");
    let (conf, listing) = read("/etc/app.conf");
    assert_eq!(conf, "listen = 8080");
    assert!(listing.starts_with("-r--r-----"), "{listing}");
    s.ok(&["down"]);
}

#[test]
fn containers_reach_a_published_port_through_the_proxy_at_host_docker_internal() {
    let Some(image) = demo_image() else { return };
    let (web_port, db_port) = (free_port(), free_port());
    let gateway = bridge_gateway();
    let s = TestStack::new(&format!(
        r#"
x-capstan:
  scrape_interval: 1s
services:
  web:
    image: {image}
    labels: {{capstan.test: "{{marker}}"}}
    ports: ["127.0.0.1:{web_port}:8080"]
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s}}
  db:
    image: {image}
    labels: {{capstan.test: "{{marker}}"}}
    ports: ["{gateway}:{db_port}:8080"]
    deploy: {{replicas: 2}}
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s}}
"#
    ));
    let _guard = Leftovers(s.marker.clone());
    s.up();
    for _ in 0..10 {
        let (code, body) = http_fetch(
            &format!("127.0.0.1:{web_port}"),
            &format!("/fetch?url=http://host.docker.internal:{db_port}/"),
        );
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("hello from db"), "{body}");
    }
    // Counted by the proxy, per replica of db: balanced over both.
    wait_for("the proxy's counts of db", Duration::from_secs(30), || {
        let out = s.ok(&[
            "query",
            "sum by (replica) (http_requests_total{service=\"db\"})",
            "-o",
            "json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let counts: Vec<f64> = v["data"]["result"]
            .as_array()?
            .iter()
            .filter_map(|r| r["value"][1].as_str()?.parse().ok())
            .collect();
        (counts.len() == 2 && counts.iter().sum::<f64>() >= 10.0).then_some(())
    });
    s.ok(&["down"]);
}

#[test]
fn a_stack_runs_on_podmans_docker_compatible_socket() {
    let Some(image) = demo_image() else { return };
    let podman = need("podman");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("podman.sock");
    // Podman's default limits (a million open files, four million
    // processes) are above what this machine lets a process have; compose
    // files on such a machine would set `ulimits`, the socket's default does
    // here.
    let conf = dir.path().join("containers.conf");
    std::fs::write(
        &conf,
        "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n",
    )
    .unwrap();
    let _service = Killed(
        Command::new(&podman)
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .env("CONTAINERS_CONF", &conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("podman's socket", Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&socket).ok()
    });
    // The demo image, from the Docker engine into Podman's store.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("docker save {image} | {podman} load"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let s = TestStack::new(&format!(
        r#"
services:
  web:
    image: localhost/{image}
    labels: {{capstan.test: "{{marker}}"}}
    ports: ["127.0.0.1:{port}:8080"]
    deploy: {{replicas: 2}}
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s}}
  db:
    image: localhost/{image}
    labels: {{capstan.test: "{{marker}}"}}
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s}}
"#
    ));
    let host = format!("unix://{}", socket.display());
    let env = [("DOCKER_HOST", host.as_str())];
    let out = s.run_env(&["check"], &env);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("at {host}")), "{said}");
    let out = s.run_env(
        &[
            "up",
            "-d",
            "--listen",
            "127.0.0.1:0",
            "--wait-timeout",
            "60s",
        ],
        &env,
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let podman_ps = || -> Vec<String> {
        let out = Command::new(&podman)
            .args(["ps", "-a", "--format", "{{.Names}}", "--filter"])
            .arg(format!("label=capstan.test={}", s.marker))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(podman_ps().len(), 3, "{:?}", podman_ps());
    // Through the proxy, and from one container to another by name.
    let (code, body) = http_fetch(&format!("127.0.0.1:{port}"), "/fetch?url=http://db:8080/");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("hello from db"), "{body}");
    let logs = s.ok(&["logs", "web"]);
    assert!(logs.contains("\"msg\":\"listening\""), "{logs}");
    s.ok(&["down"]);
    assert!(podman_ps().is_empty(), "{:?}", podman_ps());
}

#[test]
fn the_images_own_healthcheck_runs_unless_disabled() {
    let Some(image) = demo_image() else { return };
    let s = TestStack::new(
        r#"
services:
  checked:
    build: ./img
    labels: {capstan.test: "{marker}"}
  unchecked:
    build: ./img
    labels: {capstan.test: "{marker}"}
    healthcheck: {disable: true}
"#,
    );
    let _guard = Leftovers(s.marker.clone());
    let ctx = s.dir.path().join("img");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {image}\nHEALTHCHECK --interval=1s --timeout=2s CMD [\"/capstan-demo\", \"check\"]\n"
        ),
    )
    .unwrap();
    let _ = s.up_unchecked("20s");
    wait_for("the image's check passing", Duration::from_secs(20), || {
        s.replicas("checked")
            .first()
            .is_some_and(|r| r["health"] == "healthy")
            .then_some(())
    });
    let unchecked = s.replicas("unchecked");
    assert_eq!(unchecked[0]["health"], "none", "{unchecked:?}");
    s.ok(&["down"]);
}

/// The Debian base image with python3 and Flask (debootstrap, `docker
/// import`), built by scripts/debian-python-image when missing.
fn debian_python_image() {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/debian-python-image");
    let out = Command::new(script).output().unwrap();
    assert!(
        out.status.success(),
        "scripts/debian-python-image: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copies a directory tree (the example stack) into `to`.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            if e.file_name() != ".capstan" {
                copy_tree(&e.path(), &dest);
            }
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// `examples/flask`: Flask built from its Dockerfile (3 replicas behind the
/// proxy) and a database-like service from an image with a named volume.
#[test]
fn the_flask_example_runs_and_its_services_talk() {
    if let Err(why) = engine() {
        eprintln!("skipped: {why}");
        return;
    }
    debian_python_image();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/flask");
    let port = free_port();
    let yaml = std::fs::read_to_string(example.join("capstan.yaml"))
        .unwrap()
        .replace("name: flask", "x-capstan:\n  scrape_interval: 1s")
        .replace("\"5000:5000\"", &format!("\"127.0.0.1:{port}:5000\""))
        .replace(
            "  web:\n",
            "  web:\n    labels: {capstan.test: \"{marker}\"}\n",
        )
        .replace(
            "  db:\n",
            "  db:\n    labels: {capstan.test: \"{marker}\"}\n",
        );
    let s = TestStack::new(&yaml);
    let _guard = Leftovers(s.marker.clone());
    copy_tree(&example, s.dir.path());
    s.write(&yaml);
    s.up();
    assert_eq!(healthy(&s), 3, "{:?}", s.replicas("web"));
    let resp = http_get(port, "/").unwrap();
    assert!(resp.contains("Hello from Flask"), "{resp}");
    // web reaches db by its service name; db keeps the count in its volume.
    let (code, first) = http_fetch(&format!("127.0.0.1:{port}"), "/visits");
    assert_eq!(code, 200, "{first}");
    let (_, second) = http_fetch(&format!("127.0.0.1:{port}"), "/visits");
    let n = |t: &str| -> u64 { t.trim().trim_start_matches("visits: ").parse().unwrap() };
    assert_eq!(n(&second), n(&first) + 1, "{first} then {second}");
    // Logs, metrics and the proxy's traces of the containers.
    let logs = s.ok(&["logs", "db"]);
    assert!(logs.contains("GET /incr"), "{logs}");
    wait_for(
        "memory series of the web containers",
        Duration::from_secs(30),
        || {
            let out = s.ok(&[
                "query",
                "container_memory_working_set_bytes{service=\"web\"}",
            ]);
            (out.lines()
                .filter(|l| l.contains("container_memory"))
                .count()
                == 3)
                .then_some(())
        },
    );
    proxy_span_in_trace(&s, port, "web");
    s.ok(&["down", "--volumes"]);
    assert!(containers(&s.marker).is_empty());
}

#[test]
fn check_and_up_name_the_engine_they_need() {
    let s = TestStack::new("services:\n  web:\n    image: capstan-demo:test\n");
    let _guard = Leftovers(s.marker.clone());
    // No engine at the socket DOCKER_HOST names: both refuse, naming it.
    let missing = format!("unix://{}/none.sock", s.dir.path().display());
    for args in [vec!["check"], vec!["up", "-d"]] {
        let out = s.run_env(&args, &[("DOCKER_HOST", missing.as_str())]);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("services web run as containers, but no container engine at")
                && err.contains(&missing),
            "{err}"
        );
    }
    if engine().is_ok() {
        let out = s.ok(&["check"]);
        assert!(out.contains("containers on engine"), "{out}");
    }
}

#[test]
fn containers_autoscale_on_their_cpu() {
    let Some(image) = demo_image() else { return };
    let port = free_port();
    let s = TestStack::new(&format!(
        r#"
services:
  web:
    image: {image}
    labels: {{capstan.test: "{{marker}}"}}
    environment: {{LOG_REQUESTS: "0"}}
    ports: ["127.0.0.1:{port}:8080"]
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s}}
      metrics: {{disable: true}}
      autoscale:
        min: 1
        max: 3
        interval: 1s
        metrics: [{{cpu: 50%}}]
    deploy:
      resources: {{limits: {{cpus: "0.25"}}}}
"#
    ));
    let _guard = Leftovers(s.marker.clone());
    s.up();
    // Four clients each asking for 40 ms of CPU: far over a quarter CPU at 50%.
    let mut load = Command::new(capstan_bin())
        .args([
            "load",
            &format!("http://127.0.0.1:{port}/work?ms=40"),
            "-c",
            "4",
            "-d",
            "20s",
            "-o",
            "json",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "a scale up of the containers",
        Duration::from_secs(20),
        || (healthy(&s) >= 2).then_some(()),
    );
    let _ = load.kill();
    let _ = load.wait();
    let events = s.events();
    let scaled = events
        .iter()
        .find(|e| e["kind"] == "autoscaled")
        .expect("an autoscaled event");
    let reason = scaled["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("1 → ") && reason.contains("cpu"),
        "{reason}"
    );
    assert!(containers(&s.marker).len() >= 2);
    s.ok(&["down"]);
}
