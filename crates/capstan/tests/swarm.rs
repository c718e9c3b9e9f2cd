//! `capstan export swarm` on a real Swarm: a single-node swarm on this
//! machine's Docker Engine (initialized here and left at the end when the
//! test made it), `docker stack deploy` of the exported file with the demo
//! image built here; the services converge, the published port answers
//! through the routing mesh, and `docker service update --image` rolls the
//! next image as the exported `update_config` says.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn docker(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text.trim().to_owned())
}

/// Removes the stack, and leaves the swarm if this test made it.
struct Swarm {
    own: bool,
    stack: String,
}

impl Drop for Swarm {
    fn drop(&mut self) {
        docker(&["stack", "rm", &self.stack]);
        // The stack's network goes once its tasks are gone.
        for _ in 0..60 {
            let (_, left) = docker(&[
                "service",
                "ls",
                "-q",
                "--filter",
                &format!("label=com.docker.stack.namespace={}", self.stack),
            ]);
            if left.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        if self.own {
            docker(&["swarm", "leave", "--force"]);
        }
    }
}

/// An address of this machine the routing mesh answers on.
fn mesh_addresses() -> Vec<String> {
    let mut out = vec!["127.0.0.1".to_owned()];
    let ip = Command::new("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&ip.stdout).lines() {
        if let Some(a) = line
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            && a != "127.0.0.1"
        {
            out.push(a.to_owned());
        }
    }
    out
}

fn get(addr: &str, port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect_timeout(
        &format!("{addr}:{port}").parse().ok()?,
        Duration::from_secs(1),
    )
    .ok()?;
    c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(c, "GET / HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    s.contains("200 OK").then_some(s)
}

#[test]
fn the_exported_stack_runs_on_a_real_swarm_and_rolls_as_exported() {
    let Some(image) = demo_image() else { return };
    let v1 = "capstan-demo:swarm-v1";
    let v2 = "capstan-demo:swarm-v2";
    assert!(docker(&["tag", image, v1]).0 && docker(&["tag", image, v2]).0);
    let port = free_port();
    let s = TestStack::new(&format!(
        r#"name: swarmtest
services:
  web:
    image: {v1}
    environment: {{LOG_REQUESTS: "0"}}
    expose: ["8080"]
    healthcheck:
      test: ["CMD", "/capstan-demo", "check", "/healthz"]
      interval: 1s
      timeout: 1s
      retries: 3
    deploy:
      replicas: 2
      resources: {{limits: {{memory: 64m, cpus: "0.5"}}}}
      restart_policy: {{condition: any, delay: 1s}}
      update_config: {{parallelism: 1, delay: 3s, order: start-first, monitor: 1s, failure_action: rollback}}
    x-capstan:
      proxy: {{access_log: false}}
  front:
    image: {v1}
    ports: ["{port}:8080"]
    deploy:
      replicas: 1
      update_config: {{order: stop-first}}
"#
    ));
    // By default published ports go through the routing mesh.
    let out = s.run(&["export", "swarm"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("not mapped: services.web.x-capstan.proxy"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("mode: ingress"));
    // This machine's kernel has no IPVS, which the routing mesh needs (a port
    // published in ingress mode never answers here, whatever the service),
    // so the stack deployed here publishes on the node: `front`, one task.
    let file = s.dir.path().join("stack.yml");
    let out = s.run(&[
        "export",
        "swarm",
        "--publish-mode",
        "host",
        "-o",
        &file.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A swarm: this machine's, or one made here.
    let (_, state) = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
    let own = state == "inactive";
    if own {
        let (ok, why) = docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
        assert!(ok, "docker swarm init: {why}");
    }
    let name = format!("capstan{}", std::process::id());
    let _swarm = Swarm {
        own,
        stack: name.clone(),
    };
    let (ok, why) = docker(&[
        "stack",
        "deploy",
        "--resolve-image",
        "never",
        "-c",
        &file.display().to_string(),
        &name,
    ]);
    assert!(ok, "docker stack deploy: {why}");
    let svc = format!("{name}_web");
    for (svc, want) in [(svc.clone(), "2/2"), (format!("{name}_front"), "1/1")] {
        wait_for("the services to converge", Duration::from_secs(120), || {
            let (_, r) = docker(&[
                "service",
                "ls",
                "--filter",
                &format!("name={svc}"),
                "--format",
                "{{.Replicas}}",
            ]);
            (r == want).then_some(())
        });
    }
    // What the exported file set, as the engine holds it.
    let (_, spec) = docker(&["service", "inspect", &svc, "--format", "{{json .Spec}}"]);
    let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    let u = &spec["UpdateConfig"];
    assert_eq!(u["Parallelism"], 1, "{u}");
    assert_eq!(u["Delay"], 3_000_000_000u64, "{u}");
    assert_eq!(u["Order"], "start-first", "{u}");
    assert_eq!(u["FailureAction"], "rollback", "{u}");
    assert_eq!(u["Monitor"], 1_000_000_000u64, "{u}");
    let task = &spec["TaskTemplate"];
    assert_eq!(
        task["Resources"]["Limits"]["MemoryBytes"],
        64 << 20,
        "{task}"
    );
    assert_eq!(
        task["Resources"]["Limits"]["NanoCPUs"], 500_000_000,
        "{task}"
    );
    assert_eq!(task["RestartPolicy"]["Condition"], "any", "{task}");
    assert_eq!(
        task["ContainerSpec"]["Healthcheck"]["Test"],
        serde_json::json!(["CMD", "/capstan-demo", "check", "/healthz"])
    );
    let (_, front) = docker(&[
        "service",
        "inspect",
        &format!("{name}_front"),
        "--format",
        "{{json .Spec.EndpointSpec}}",
    ]);
    let front: serde_json::Value = serde_json::from_str(&front).unwrap();
    assert_eq!(front["Ports"][0]["PublishedPort"], port, "{front}");
    assert_eq!(front["Ports"][0]["PublishMode"], "host", "{front}");
    // The published port answers.
    let addrs = mesh_addresses();
    let body = wait_for(
        "the published port to answer",
        Duration::from_secs(90),
        || addrs.iter().find_map(|a| get(a, port)),
    );
    assert!(body.contains("hello from front"), "{body}");
    // The next image rolls one task at a time, 3 s apart.
    let (ok, why) = docker(&["service", "update", "--detach", "--image", v2, &svc]);
    assert!(ok, "{why}");
    wait_for("the update to complete", Duration::from_secs(120), || {
        let (_, st) = docker(&[
            "service",
            "inspect",
            &svc,
            "--format",
            "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}",
        ]);
        (st == "completed").then_some(())
    });
    let (_, ids) = docker(&[
        "service",
        "ps",
        "-q",
        "--filter",
        "desired-state=running",
        &svc,
    ]);
    let mut created: Vec<(i64, String)> = ids
        .lines()
        .map(|id| {
            let (_, t) = docker(&[
                "inspect",
                "--format",
                "{{.CreatedAt}}|{{.Spec.ContainerSpec.Image}}",
                id,
            ]);
            let (when, img) = t.split_once('|').unwrap();
            let ts: jiff::Timestamp = when
                .trim()
                .replace(" +0000 UTC", "Z")
                .replace(' ', "T")
                .parse()
                .unwrap_or_else(|e| panic!("{when}: {e}"));
            (ts.as_millisecond(), img.to_owned())
        })
        .collect();
    created.sort();
    assert_eq!(created.len(), 2, "{created:?}");
    assert!(
        created.iter().all(|(_, i)| i.starts_with(v2)),
        "{created:?}"
    );
    let gap = created[1].0 - created[0].0;
    assert!(
        gap >= 3_000,
        "tasks replaced {gap} ms apart, not one by one 3 s apart: {created:?}"
    );
    drop(_swarm);
    docker(&["rmi", v1, v2]);
}

/// `capstan export swarm --push REGISTRY`: the `build:` services are built
/// and pushed to a real registry (Debian's docker-registry on loopback), and
/// the exported file names the pushed images.
#[test]
fn built_images_are_pushed_and_named_in_the_exported_file() {
    let Some(image) = demo_image() else { return };
    let port = free_port();
    let store = tempfile::tempdir().unwrap();
    let config = store.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            store.path().join("data").display()
        ),
    )
    .unwrap();
    let _registry = start_registry(&config, port);
    let s = TestStack::new(
        "name: pushtest\nservices:\n  web:\n    build: ./web\n    ports: [\"8080:8080\"]\n",
    );
    std::fs::create_dir_all(s.dir.path().join("web")).unwrap();
    std::fs::write(
        s.dir.path().join("web/Dockerfile"),
        format!("FROM {image}\nENV VERSION=pushed\n"),
    )
    .unwrap();
    let file = s.dir.path().join("stack.yml");
    let registry_host = format!("127.0.0.1:{port}");
    let out = s.run(&[
        "export",
        "swarm",
        "--push",
        &registry_host,
        "-o",
        &file.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("not mapped: services.web.build"),
        "{stderr}"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let named = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("image: "))
        .unwrap_or_else(|| panic!("no image in {text}"))
        .to_owned();
    let prefix = format!("{registry_host}/pushtest-web:");
    assert!(named.starts_with(&prefix), "{named}");
    let tag = &named[prefix.len()..];
    // The registry holds that tag.
    let (code, body) = http_fetch(&registry_host, "/v2/pushtest-web/tags/list");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&format!("\"{tag}\"")), "{tag} not in {body}");
    docker(&["rmi", &named]);
}
