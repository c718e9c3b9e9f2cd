use std::collections::BTreeMap;
use std::path::Path;

use super::*;

fn opts(env: &[(&str, &str)]) -> LoadOptions {
    LoadOptions {
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        profiles: Vec::new(),
    }
}

fn parse(text: &str) -> Result<(Stack, Vec<Diagnostic>), LoadError> {
    parse_text(
        text,
        "capstan.yaml",
        Path::new("/srv/app"),
        "app",
        BTreeMap::new(),
        &opts(&[]),
    )
}

fn errors(text: &str) -> String {
    match parse(text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn replicas_must_be_an_integer() {
    let text = "services:\n  web:\n    command: [demo]\n    deploy:\n      replicas: two\n";
    insta::assert_snapshot!(errors(text), @r#"capstan.yaml:5:17: services.web.deploy.replicas: expected a non-negative integer, found "two""#);
}

#[test]
fn each_kind_of_bad_value() {
    let text = r#"
services:
  web:
    command: 42
    ports: ["8080:80", "99999", "8000-8002:80"]
    stop_signal: SIGNOPE
    stop_grace_period: ten
    restart: sometimes
    healthcheck:
      test: ["WAT"]
      retries: -1
    deploy:
      replicas: -3
      resources:
        limits:
          memory: lots
          cpus: zero
          pids: 0
      restart_policy:
        condition: maybe
        delay: soon
    depends_on:
      db:
        condition: service_ready
  img:
    image: nginx
  empty: {}
"#;
    insta::assert_snapshot!(errors(text));
}

#[test]
fn syntax_errors_have_positions() {
    let e = errors("services:\n  web:\n    command: [a, b\n  other: 1\n");
    assert!(e.starts_with("capstan.yaml:"), "{e}");
    assert!(e.contains("invalid YAML"), "{e}");
    let (line, _) = e["capstan.yaml:".len()..].split_once(':').unwrap();
    assert!(line.parse::<u32>().unwrap() >= 3, "{e}");
}

#[test]
fn dependency_errors() {
    let text = "services:\n  a:\n    command: x\n    depends_on: [b]\n  b:\n    command: x\n    depends_on: [c]\n  c:\n    command: x\n    depends_on: [a, ghost]\n";
    insta::assert_snapshot!(errors(text));
}

#[test]
fn an_image_runs_as_containers_unless_the_process_driver_is_asked_for() {
    let (stack, _) = parse("services:\n  db:\n    image: postgres:16\n").unwrap();
    assert_eq!(stack.services["db"].driver(), DriverKind::Container);
    let (stack, _) = parse(
        "services:\n  db:\n    image: postgres:16\n    command: [postgres]\n    x-capstan: {driver: process}\n",
    )
    .unwrap();
    assert_eq!(stack.services["db"].driver(), DriverKind::Process);
    let (stack, _) = parse("services:\n  w:\n    command: [w]\n").unwrap();
    assert_eq!(stack.services["w"].driver(), DriverKind::Process);
    let e = errors("services:\n  db:\n    image: postgres:16\n    x-capstan: {driver: process}\n");
    assert!(
        e.starts_with("capstan.yaml:2:3: services.db: nothing to run"),
        "{e}"
    );
    let e = errors("services:\n  w:\n    command: [w]\n    x-capstan: {driver: container}\n");
    assert!(
        e.contains("services.w.x-capstan.driver: the container driver needs an image"),
        "{e}"
    );
    let e = errors("services:\n  w:\n    command: [w]\n    x-capstan: {driver: vm}\n");
    assert!(
        e.contains("expected process or container, found \"vm\""),
        "{e}"
    );
}

#[test]
fn unknown_keys_warn_once_each() {
    let text = "version: '3'\nservices:\n  web:\n    command: x\n    build: .\n    colour: blue\n    deploy:\n      mode: replicated\n      replica: 2\n    x-note: fine\nnetworks: {}\nx-anchors: {}\n";
    let (_, warnings) = parse(text).unwrap();
    let lines: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
    insta::assert_snapshot!(lines.join("\n"));
}

#[test]
fn interpolation() {
    let text = "name: ${PROJECT:-demo}\nservices:\n  web:\n    command: [\"serve\", \"--port=$${PORT}\", \"${FLAG}\"]\n    environment:\n      A: ${A}\n      B: ${B:-fallback}\n      PASS:\n    deploy:\n      replicas: ${N:-2}\n";
    let (stack, _) = parse_text(
        text,
        "capstan.yaml",
        Path::new("/x"),
        "x",
        [
            ("FLAG".to_string(), "from-dotenv".to_string()),
            ("A".to_string(), "dot".to_string()),
        ]
        .into(),
        &opts(&[("A", "shell"), ("PASS", "through"), ("N", "4")]),
    )
    .unwrap();
    assert_eq!(stack.name, "demo");
    let web = &stack.services["web"];
    assert_eq!(
        web.command,
        Some(Cmd::Exec(vec![
            "serve".into(),
            "--port=${PORT}".into(),
            "from-dotenv".into()
        ]))
    );
    assert_eq!(
        web.environment["A"], "shell",
        "the shell environment wins over .env"
    );
    assert_eq!(web.environment["B"], "fallback");
    assert_eq!(web.environment["PASS"], "through");
    assert_eq!(web.deploy.replicas, 4);

    let e = errors("services:\n  web:\n    command: ${CMD:?set CMD to the program to run}\n");
    assert_eq!(
        e,
        "capstan.yaml:3:14: services.web.command: required variable CMD is missing a value: set CMD to the program to run"
    );
}

#[test]
fn normalized_forms() {
    let text = r#"
services:
  web:
    command: demo --fast
    environment: ["A=1", "B=two=2"]
    restart: on-failure:5
    stop_signal: INT
    stop_grace_period: 1m30s
    ports: ["127.0.0.1:8080:http", {published: 9090, target: "9090"}]
    healthcheck:
      test: curl -f localhost
      interval: 2s
    x-capstan:
      healthcheck: {http: healthz, interval: 1s, retries: 5}
    labels: [team=core]
    mem_limit: 256m
  worker:
    command: [work]
    depends_on:
      web: {condition: service_healthy}
    deploy:
      replicas: 0
      restart_policy: {max_attempts: 3, window: 10s}
"#;
    let (stack, warnings) = parse(text).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    insta::assert_snapshot!(to_yaml(&stack));
    // The normalized form loads back to the same stack.
    let again: Stack = serde_saphyr::from_str(&to_yaml(&stack)).unwrap();
    assert_eq!(again, stack);
}

#[test]
fn profiles_select_services() {
    let text = "services:\n  web:\n    command: x\n  debug:\n    command: x\n    profiles: [dev]\n";
    let (stack, _) = parse(text).unwrap();
    assert_eq!(stack.services.keys().collect::<Vec<_>>(), ["web"]);
    let mut o = opts(&[]);
    o.profiles = vec!["dev".into()];
    let (stack, _) = parse_text(text, "c.yaml", Path::new("/"), "x", BTreeMap::new(), &o).unwrap();
    assert_eq!(stack.services.len(), 2);
}

#[test]
fn examples_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let file = entry.unwrap().path().join("capstan.yaml");
        if file.is_file() {
            let loaded = load(&file, &LoadOptions::default())
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert!(
                loaded.warnings.is_empty(),
                "{}: {:?}",
                file.display(),
                loaded.warnings
            );
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[test]
fn env_files_and_dotenv_beside_the_stack() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), "TAG=from-dotenv\nREPLICAS=2\n").unwrap();
    std::fs::write(dir.path().join("web.env"), "# defaults\nA=file\nB=file\n").unwrap();
    std::fs::write(
        dir.path().join("capstan.yaml"),
        "services:\n  web:\n    command: [serve, \"${TAG}\"]\n    env_file: [web.env, {path: missing.env, required: false}]\n    environment: {B: inline}\n    working_dir: sub\n    deploy: {replicas: \"${REPLICAS}\"}\n",
    )
    .unwrap();
    let loaded = load(&dir.path().join("capstan.yaml"), &opts(&[])).unwrap();
    let web = &loaded.stack.services["web"];
    assert_eq!(
        web.command,
        Some(Cmd::Exec(vec!["serve".into(), "from-dotenv".into()]))
    );
    assert_eq!(web.environment["A"], "file");
    assert_eq!(
        web.environment["B"], "inline",
        "environment wins over env_file"
    );
    assert_eq!(web.deploy.replicas, 2);
    assert_eq!(
        web.working_dir.as_deref(),
        Some(dir.path().join("sub").to_str().unwrap())
    );

    std::fs::write(
        dir.path().join("capstan.yaml"),
        "services:\n  web:\n    command: x\n    env_file: nope.env\n",
    )
    .unwrap();
    let e = load(&dir.path().join("capstan.yaml"), &opts(&[]))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("capstan.yaml:4:15: services.web.env_file: cannot read env file"),
        "{e}"
    );
}

#[test]
fn storage_and_scrape_settings() {
    let text = "x-capstan:\n  scrape_interval: 5s\n  storage: {retention: 30d, retention_size: 10g, max_series: 1000}\nservices:\n  web:\n    command: x\n";
    let e = errors(&text.replace("30d", "30days"));
    assert_eq!(
        e,
        "capstan.yaml:3:24: x-capstan.storage.retention: expected a duration like 10s, 1m30s or 500ms, found \"30days\""
    );
    let (stack, _) = parse(&text.replace("30d", "4w2d")).unwrap();
    assert_eq!(stack.settings.storage.retention, Dur::secs(720 * 3600));
    assert_eq!(stack.settings.storage.retention_size, Some(10 << 30));
    assert_eq!(stack.settings.storage.max_series, 1000);
    assert_eq!(stack.settings.scrape_interval, Dur::secs(5));
    let e = errors("x-capstan:\n  scrape_interval: 500ms\nservices:\n  web:\n    command: x\n");
    assert!(
        e.contains("x-capstan.scrape_interval: the scrape interval must be at least 1s"),
        "{e}"
    );
}

#[test]
fn proxy_trace_sampling() {
    let text = |v: &str| {
        format!("services:\n  web:\n    command: x\n    x-capstan:\n      proxy: {{traces: {v}}}\n")
    };
    let ratio = |v: &str| parse(&text(v)).unwrap().0.services["web"].x.proxy.traces;
    assert_eq!(ratio("true"), 1.0);
    assert_eq!(ratio("false"), 0.0);
    assert_eq!(ratio("0.25"), 0.25);
    assert_eq!(ratio("10%"), 0.1);
    assert_eq!(ratio("0"), 0.0);
    assert_eq!(
        parse("services:\n  web:\n    command: x\n")
            .unwrap()
            .0
            .services["web"]
            .x
            .proxy
            .traces,
        1.0
    );
    for bad in ["2", "-0.5", "often", "150%"] {
        let e = errors(&text(bad));
        assert!(
            e.contains(
                "services.web.x-capstan.proxy.traces: expected true, false or a sampling ratio"
            ),
            "{bad}: {e}"
        );
    }
}

#[test]
fn volumes_in_every_form_and_their_errors() {
    let (stack, _) = parse(
        "services:\n  db:\n    image: x\n    volumes:\n      - data:/var/lib/db\n      - ./conf:/etc/conf:ro\n      - /cache\n      - {type: tmpfs, target: /tmp}\nvolumes:\n  data: {}\n",
    )
    .unwrap();
    let v = &stack.services["db"].volumes;
    assert_eq!(v.len(), 4);
    assert_eq!(
        (v[0].kind, v[0].source.as_deref()),
        (VolumeKind::Volume, Some("data"))
    );
    assert_eq!(v[1].kind, VolumeKind::Bind);
    assert_eq!(v[1].source.as_deref(), Some("/srv/app/./conf"));
    assert!(v[1].read_only);
    assert_eq!(
        (v[2].kind, v[2].source.as_deref()),
        (VolumeKind::Volume, None)
    );
    assert_eq!(v[3].kind, VolumeKind::Tmpfs);
    assert!(stack.volumes.contains("data"));
    let e = errors("services:\n  db:\n    image: x\n    volumes: [\"data:/d\"]\n");
    assert!(
        e.contains("services.db.volumes[0]: refers to undefined volume \"data\""),
        "{e}"
    );
    let e = errors("services:\n  db:\n    image: x\n    volumes: [\"./a:rel\"]\n");
    assert!(
        e.contains("must be an absolute path in the container"),
        "{e}"
    );
    let e = errors("services:\n  db:\n    image: x\n    volumes: [\"a:b:c:d\"]\n");
    assert!(e.contains("expected SOURCE:TARGET[:MODE]"), "{e}");
    let (_, warnings) =
        parse("services:\n  w:\n    command: [w]\n    volumes: [\"/a:/b\"]\n").unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.to_string().contains("mounts apply to containers")),
        "{warnings:?}"
    );
}

#[test]
fn udp_ports_are_for_containers() {
    let (stack, _) =
        parse("services:\n  dns:\n    image: x\n    ports: [\"5353:53/udp\", \"8080:80\"]\n")
            .unwrap();
    let p = &stack.services["dns"].ports;
    assert_eq!((p[0].published, p[0].protocol.as_str()), (5353, "udp"));
    let e = errors("services:\n  dns:\n    command: [x]\n    ports: [\"5353:53/udp\"]\n");
    assert!(
        e.contains("UDP ports are published by the container engine"),
        "{e}"
    );
    // The same number over TCP and UDP is no conflict.
    parse("services:\n  a:\n    image: x\n    ports: [\"53:53/udp\"]\n  b:\n    image: x\n    ports: [\"53:53\"]\n").unwrap();
    let e = errors("services:\n  a:\n    image: x\n    ports: [\"53:53/sctp\"]\n");
    assert!(e.contains("expected tcp or udp"), "{e}");
}

#[test]
fn http2_to_the_replicas_by_protocol_or_app_protocol() {
    let svc = |ports: &str, x: &str| {
        let text = format!("services:\n  g:\n    command: [x]\n    ports: {ports}\n{x}");
        parse(&text).unwrap().0.services["g"].clone()
    };
    assert_eq!(svc("[\"9000\"]", "").proxy_protocol(), Protocol::Http);
    let s = svc("[{published: 9000, app_protocol: grpc}]", "");
    assert_eq!(s.ports[0].app_protocol.as_deref(), Some("grpc"));
    assert_eq!(s.proxy_protocol(), Protocol::H2c);
    let s = svc("[{published: 9000, app_protocol: http}]", "");
    assert_eq!(s.proxy_protocol(), Protocol::Http);
    for p in ["h2c", "grpc"] {
        let x = format!("    x-capstan: {{protocol: {p}}}\n");
        assert_eq!(svc("[\"9000\"]", &x).proxy_protocol(), Protocol::H2c);
    }
    // Declared raw TCP wins over a port's hint.
    let x = "    x-capstan: {protocol: tcp}\n";
    let s = svc("[{published: 9000, app_protocol: grpc}]", x);
    assert_eq!(s.proxy_protocol(), Protocol::Tcp);
    let e = errors("services:\n  g:\n    command: [x]\n    x-capstan: {protocol: h3}\n");
    assert!(e.contains("expected http, h2c (or grpc) or tcp"), "{e}");
}

#[test]
fn pull_policies() {
    let (stack, _) = parse("services:\n  a:\n    image: x\n    pull_policy: never\n").unwrap();
    assert_eq!(
        stack.services["a"].container.pull_policy.as_deref(),
        Some("never")
    );
    let (stack, _) =
        parse("services:\n  a:\n    image: x\n    pull_policy: if_not_present\n").unwrap();
    assert_eq!(
        stack.services["a"].container.pull_policy.as_deref(),
        Some("missing")
    );
    let e = errors("services:\n  a:\n    image: x\n    pull_policy: sometimes\n");
    assert!(
        e.contains("expected missing, always, never or build"),
        "{e}"
    );
}

#[test]
fn networks_secrets_and_configs_must_be_declared() {
    let text = "services:\n  web:\n    image: x\n    networks: [front]\n    secrets: [key]\n    configs: [conf]\n";
    insta::assert_snapshot!(errors(text), @r#"
    capstan.yaml:2:3: services.web.networks.front: refers to undefined network "front": declare it under the top-level networks
    capstan.yaml:2:3: services.web.secrets: refers to undefined secret "key": declare it under the top-level secrets
    capstan.yaml:2:3: services.web.configs: refers to undefined config "conf": declare it under the top-level configs
    "#);
}

#[test]
fn container_keys_are_checked() {
    let text = "services:\n  web:\n    image: x\n    ulimits:\n      nofile: {soft: 20, hard: 10}\n    tmpfs: run\n    secrets:\n      - source: key\n        mode: 0999\nsecrets:\n  key: {external: true}\n";
    insta::assert_snapshot!(errors(text), @r#"
    capstan.yaml:5:15: services.web.ulimits.nofile: the soft limit 20 is above the hard limit 10
    capstan.yaml:6:12: services.web.tmpfs[0]: expected an absolute path in the container, found "run"
    capstan.yaml:9:15: services.web.secrets[0].mode: expected an octal file mode such as 0440, found "999"
    capstan.yaml:11:8: secrets.key: external secrets and configs live in Swarm; give a file, content or environment
    "#);
}

#[test]
fn networks_and_files_resolve_from_the_top_level() {
    let text = "services:\n  web:\n    image: x\n    networks:\n      front: {aliases: [www]}\n    secrets: [key]\n    configs: [{source: conf, target: /etc/c.conf, mode: 0440}]\n  db:\n    image: y\nnetworks:\n  front: {internal: true}\nsecrets:\n  key: {file: ./key.txt}\nconfigs:\n  conf: {content: hi}\n";
    let (stack, warnings) = parse(text).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let web = &stack.services["web"].container;
    assert_eq!(web.networks.len(), 1);
    assert_eq!(web.networks[0].key, "front");
    assert_eq!(web.networks[0].aliases, ["www"]);
    assert!(web.networks[0].def.internal);
    assert_eq!(web.files[0].target, "/run/secrets/key");
    assert_eq!(
        web.files[0].source,
        FileSource::File("/srv/app/key.txt".into())
    );
    assert_eq!(web.files[1].target, "/etc/c.conf");
    assert_eq!(web.files[1].mode, Some(0o440));
    assert_eq!(web.files[1].source, FileSource::Content("hi".into()));
    // A service on the default network only is defined as before networks
    // could be declared (its definition hash does not change).
    assert!(stack.services["db"].container.is_default());
}

#[test]
fn a_webhook_must_be_plain_http_for_now() {
    let text = "x-capstan:\n  notify: {webhook: \"https://hooks.example/x\"}\nservices:\n  web: {command: [x]}\n";
    insta::assert_snapshot!(errors(text), @"capstan.yaml:2:21: x-capstan.notify.webhook: https://hooks.example/x: https webhooks need TLS, which capstan has not yet; use an http:// receiver (such as a local relay)");
}

#[test]
fn a_canary_rollout_and_its_analysis() {
    let text = r#"services:
  web:
    command: [demo]
    x-capstan:
      rollout:
        strategy: canary
        steps: [{weight: 10}, {pause: 30s}, {weight: 50}, {pause: {}}]
        sticky: {cookie: canary}
        bake: 2m
        analysis:
          interval: 5s
          min_requests: 20
          on_inconclusive: rollback
          checks:
            - check: success-rate
            - {check: latency-p99, max: 250ms}
            - {name: errors, check: errors-vs-baseline}
            - {name: slow, query: 'sum(rate(http_requests_total{ {{canary}} }[{{ interval }}]))', max: 100}
"#;
    let (stack, warnings) = parse(text).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let c = stack.services["web"].x.rollout.clone().unwrap();
    assert_eq!(
        c.steps,
        [
            CanaryStep::Weight(10),
            CanaryStep::Pause(Some(Dur::secs(30))),
            CanaryStep::Weight(50),
            CanaryStep::Pause(None)
        ]
    );
    assert!(c.baseline);
    assert_eq!(c.sticky, Some(Sticky::Cookie("canary".into())));
    assert_eq!(c.bake, Dur::secs(120));
    let a = &c.analysis;
    assert_eq!((a.interval, a.min_requests), (Dur::secs(5), 20));
    assert_eq!(a.on_inconclusive, FailureAction::Rollback);
    let names: Vec<&str> = a.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["success-rate", "latency-p99", "errors", "slow"]);
    assert_eq!(a.checks[0].min, Some(0.99));
    assert_eq!(a.checks[1].max, Some(0.25));
    // Changing how it rolls out is not a new revision.
    let mut plain = stack.services["web"].clone();
    plain.x.rollout = None;
    assert!(plain.definition_eq(&stack.services["web"]));
    assert_eq!(
        plain.definition_hash(),
        stack.services["web"].definition_hash()
    );
    // strategy: rolling is the default.
    let rolling =
        "services:\n  web:\n    command: [demo]\n    x-capstan: {rollout: {strategy: rolling}}\n";
    assert!(
        parse(rolling).unwrap().0.services["web"]
            .x
            .rollout
            .is_none()
    );
}

#[test]
fn canary_errors() {
    let base = "services:\n  web:\n    command: [demo]\n    x-capstan:\n      rollout:\n";
    let cases = [
        "        strategy: blue-green\n",
        "        steps: [{weight: 10}]\n",
        "        strategy: canary\n        steps: [{weight: 0}, {weight: 101}, {wait: 1}]\n",
        "        strategy: canary\n        sticky: {header: a, cookie: b}\n",
        "        strategy: canary\n        analysis: {interval: 10ms, alpha: 0.7, checks: [{check: p50}, {check: latency-p99}, {query: 'rate(x[', max: 1}, {query: 'up'}, {query: 'x{ {{canary}}, {{nope}} }', max: 1}]}\n",
    ];
    let all: Vec<String> = cases
        .iter()
        .map(|c| errors(&format!("{base}{c}")))
        .collect();
    insta::assert_snapshot!(all.join("\n---\n"));
}

#[test]
fn a_canary_has_at_most_100_steps_and_20_checks() {
    let base = "services:\n  web:\n    command: [demo]\n    x-capstan:\n      rollout:\n        strategy: canary\n";
    let steps = |n: usize| vec!["{weight: 10}"; n].join(", ");
    let checks = |n: usize| {
        (0..n)
            .map(|i| format!("{{name: c{i}, check: success-rate}}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ok = format!(
        "{base}        steps: [{}]\n        analysis: {{checks: [{}]}}\n",
        steps(decode::MAX_STEPS),
        checks(decode::MAX_CHECKS)
    );
    let c = parse(&ok).unwrap().0.services["web"]
        .x
        .rollout
        .clone()
        .unwrap();
    assert_eq!((c.steps.len(), c.analysis.checks.len()), (100, 20));
    let over = format!(
        "{base}        steps: [{}]\n        analysis: {{checks: [{}]}}\n",
        steps(decode::MAX_STEPS + 1),
        checks(decode::MAX_CHECKS + 1)
    );
    let e = errors(&over);
    assert!(
        e.contains("rollout.steps: at most 100 steps, found 101"),
        "{e}"
    );
    assert!(
        e.contains("analysis.checks: at most 20 checks, found 21"),
        "{e}"
    );
}

#[test]
fn a_rolling_update_may_have_an_analysis() {
    let text = "services:\n  web:\n    command: [demo]\n    x-capstan:\n      rollout: {strategy: rolling, analysis: {interval: 2s, checks: [{check: success-rate, min: 0.995}]}}\n";
    let (stack, warnings) = parse(text).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let web = &stack.services["web"];
    assert!(web.x.rollout.is_none());
    let a = web.x.analysis.as_ref().unwrap();
    assert_eq!(a.interval, Dur::secs(2));
    assert_eq!(a.checks[0].min, Some(0.995));
}

#[test]
fn forwarding_targets_are_checked_within_their_limits() {
    let base = "services:\n  web:\n    command: [demo]\nx-capstan:\n";
    let e = errors(&format!(
        "{base}  remote_write:\n    - {{url: https://x/api/v1/write}}\n    - {{url: 'http://x/w', queue_config: {{max_shards: 0, max_samples_per_send: 100001}}}}\n    - {{url: 'http://x/w', queue_config: {{max_shards: 201}}, write_relabel_configs: [{{regex: '('}}]}}\n    - {{url: 'http://x/w', basic_auth: {{username: a}}, authorization: {{credentials: b}}}}\n    - {{url: 'http://x/w', bogus: 1}}\n  logs:\n    forward: {{url: 'http://x'}}\n  traces:\n    forward: [{{url: ftp://x}}]\n"
    ));
    for want in [
        "remote_write[0].url: https://x/api/v1/write: https needs TLS",
        "remote_write[1].queue_config.max_shards: must be 1 to 200",
        "remote_write[1].queue_config.max_samples_per_send: must be 1 to 100000",
        "remote_write[2].queue_config.max_shards: must be 1 to 200",
        "remote_write[2].write_relabel_configs[0]",
        "remote_write[3]: give basic_auth or authorization, not both",
        "remote_write[4]: unknown field `bogus`",
        "logs.forward: expected a list of receivers",
        "traces.forward[0].url: expected an http:// URL",
    ] {
        assert!(e.contains(want), "{want:?} not in:\n{e}");
    }
    // Within the limits: accepted.
    let ok = format!(
        "{base}  remote_write:\n    - {{url: 'http://x/w', queue_config: {{max_shards: 200, max_samples_per_send: 100000}}}}\n"
    );
    let (stack, _) = parse(&ok).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stack.settings.remote_write[0].queue_config.max_shards, 200);
}
