//! `capstan export kubernetes`: per service a Deployment (replicas, probes
//! from the health check, resources, the rolling strategy from
//! `update_config`), a Service for its ports, an Ingress for published HTTP
//! ports, a HorizontalPodAutoscaler (`autoscaling/v2`, with `behavior`) from
//! `x-capstan.autoscale`, a ConfigMap (and a Secret for values whose names
//! say they are secret) for its environment, and a PersistentVolumeClaim per
//! named volume; built from the `k8s-openapi` types.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1 as apps;
use k8s_openapi::api::autoscaling::v2 as hpa;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{DEFAULT_PORT, Export};
use crate::spec::{
    Cmd, FailureAction, HealthTest, MetricSource, PolicyKind, Protocol, RestartCondition,
    ScalingRules, SelectPolicy, Service, Stack, UpdateOrder, VolumeKind,
};

#[derive(Debug, Clone, Default)]
pub struct Options {
    pub namespace: Option<String>,
    /// Also a PodMonitor per scraped service and a PrometheusRule per rule file.
    pub prometheus_operator: bool,
    /// Also an Argo Rollouts Rollout and AnalysisTemplate per canary service.
    pub argo_rollouts: bool,
}

/// Environment variables whose names mark them as secrets go to a Secret.
pub fn looks_secret(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    [
        "PASSWORD",
        "PASSWD",
        "SECRET",
        "TOKEN",
        "API_KEY",
        "APIKEY",
        "PRIVATE_KEY",
        "CREDENTIAL",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// A DNS-1123 name from a compose name (`my_app` → `my-app`).
pub fn dns_name(s: &str) -> String {
    let mut out: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    out = out.trim_matches('-').to_owned();
    out.truncate(63);
    if out.is_empty() { "x".into() } else { out }
}

fn meta(name: &str, stack: &str, service: Option<&str>, opts: &Options) -> ObjectMeta {
    let mut labels = BTreeMap::new();
    labels.insert("app.kubernetes.io/part-of".to_owned(), dns_name(stack));
    labels.insert(
        "app.kubernetes.io/managed-by".to_owned(),
        "capstan-export".to_owned(),
    );
    if let Some(s) = service {
        labels.insert("app.kubernetes.io/name".to_owned(), dns_name(s));
    }
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: opts.namespace.clone(),
        labels: Some(labels),
        ..ObjectMeta::default()
    }
}

fn selector(service: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app.kubernetes.io/name".to_owned(), dns_name(service))])
}

fn secs(d: &crate::spec::Dur) -> i32 {
    i32::try_from(d.0.as_secs()).unwrap_or(i32::MAX)
}

/// CPUs as a Kubernetes quantity (`0.5` → `500m`).
pub fn cpu_quantity(cpus: f64) -> Quantity {
    Quantity(format!("{}m", (cpus * 1000.0).round() as u64))
}

/// Bytes as a Kubernetes quantity (`134217728` → `128Mi`).
pub fn memory_quantity(bytes: u64) -> Quantity {
    for (unit, size) in [("Gi", 1u64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return Quantity(format!("{}{unit}", bytes / size));
        }
    }
    Quantity(bytes.to_string())
}

/// The container port of a port's target (`http` or none: `$PORT`).
fn container_port(target: Option<&str>) -> u16 {
    target
        .and_then(|t| t.parse::<u16>().ok())
        .unwrap_or(DEFAULT_PORT)
}

fn probe(s: &Service, port: u16) -> Option<core::Probe> {
    let h = s.healthcheck.as_ref()?;
    let mut p = core::Probe {
        period_seconds: Some(secs(&h.interval).max(1)),
        timeout_seconds: Some(secs(&h.timeout).max(1)),
        failure_threshold: Some(i32::try_from(h.retries.max(1)).unwrap_or(3)),
        initial_delay_seconds: (h.start_period.0.as_secs() > 0).then(|| secs(&h.start_period)),
        ..core::Probe::default()
    };
    match &h.test {
        HealthTest::Http { path, port: p2 } => {
            p.http_get = Some(core::HTTPGetAction {
                path: Some(path.clone()),
                port: IntOrString::Int(i32::from(p2.unwrap_or(port))),
                ..core::HTTPGetAction::default()
            })
        }
        HealthTest::Tcp { port: p2 } => {
            p.tcp_socket = Some(core::TCPSocketAction {
                port: IntOrString::Int(i32::from(p2.unwrap_or(port))),
                ..core::TCPSocketAction::default()
            })
        }
        HealthTest::Cmd(argv) => {
            p.exec = Some(core::ExecAction {
                command: Some(argv.clone()),
            })
        }
        HealthTest::Shell(script) => {
            p.exec = Some(core::ExecAction {
                command: Some(vec!["/bin/sh".into(), "-c".into(), script.clone()]),
            })
        }
    }
    Some(p)
}

fn argv(c: &Cmd) -> Vec<String> {
    match c {
        Cmd::Exec(v) => v.clone(),
        Cmd::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
    }
}

fn strategy(s: &Service, path: &str, out: &mut Export) -> (apps::DeploymentStrategy, Option<i32>) {
    let u = &s.deploy.update_config;
    let n = if u.parallelism == 0 {
        IntOrString::String("100%".into())
    } else {
        IntOrString::Int(i32::try_from(u.parallelism).unwrap_or(i32::MAX))
    };
    let zero = IntOrString::Int(0);
    let (surge, unavailable) = match u.order {
        Some(UpdateOrder::StopFirst) => (zero, n),
        _ => (n, zero),
    };
    if u.delay.0.as_secs_f64() > 0.0 {
        out.skip(
            format!("{path}.deploy.update_config.delay"),
            "Kubernetes has no wait between batches; minReadySeconds (from `monitor`) holds each new pod before the next",
        );
    }
    if u.failure_action == FailureAction::Rollback {
        out.skip(
            format!("{path}.deploy.update_config.failure_action"),
            "a Deployment does not roll back by itself: progressDeadlineSeconds marks the rollout failed, `kubectl rollout undo` goes back",
        );
    }
    if u.max_failure_ratio > 0.0 {
        out.skip(
            format!("{path}.deploy.update_config.max_failure_ratio"),
            "Kubernetes has no failure ratio for a rollout",
        );
    }
    let min_ready = (u.monitor.0.as_secs() > 0).then(|| secs(&u.monitor));
    (
        apps::DeploymentStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(apps::RollingUpdateDeployment {
                max_surge: Some(surge),
                max_unavailable: Some(unavailable),
            }),
        },
        min_ready,
    )
}

fn scaling_rules(r: &ScalingRules) -> hpa::HPAScalingRules {
    hpa::HPAScalingRules {
        stabilization_window_seconds: Some(secs(&r.stabilization)),
        select_policy: Some(
            match r.select {
                SelectPolicy::Max => "Max",
                SelectPolicy::Min => "Min",
                SelectPolicy::Disabled => "Disabled",
            }
            .into(),
        ),
        policies: Some(
            r.policies
                .iter()
                .map(|p| hpa::HPAScalingPolicy {
                    type_: match p.kind {
                        PolicyKind::Pods => "Pods",
                        PolicyKind::Percent => "Percent",
                    }
                    .into(),
                    value: i32::try_from(p.value).unwrap_or(i32::MAX),
                    period_seconds: secs(&p.period),
                })
                .collect(),
        ),
        ..hpa::HPAScalingRules::default()
    }
}

fn autoscaler(
    name: &str,
    stack: &Stack,
    s: &Service,
    path: &str,
    opts: &Options,
    out: &mut Export,
) -> Option<hpa::HorizontalPodAutoscaler> {
    let a = s.x.autoscale.as_ref()?;
    let ap = format!("{path}.x-capstan.autoscale");
    if a.min == 0 {
        out.skip(
            format!("{ap}.min"),
            "an HPA cannot scale to zero (it needs the HPAScaleToZero feature gate or KEDA); minReplicas is 1",
        );
    }
    out.skip(
        format!("{ap}.interval"),
        "the HPA's sync period is the cluster's (--horizontal-pod-autoscaler-sync-period, 15s by default)",
    );
    if (a.tolerance - 0.1).abs() > 1e-9 {
        out.skip(
            format!("{ap}.tolerance"),
            "the HPA's tolerance is the cluster's (--horizontal-pod-autoscaler-tolerance)",
        );
    }
    if a.idle_after.0.as_secs() > 0 && a.min == 0 {
        out.skip(format!("{ap}.idle_after"), "no scale to zero on an HPA");
    }
    let value = |target: f64| Quantity(format!("{}", (target * 1000.0).round() / 1000.0));
    let metrics = a
        .metrics
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let pods = |metric: &str, note: &str, out: &mut Export| {
                out.skip(
                    format!("{ap}.metrics[{i}]"),
                    format!("{note}: the HPA reads the Pods metric {metric}, which needs a metrics adapter (prometheus-adapter or KEDA) that serves it from the pods' metrics"),
                );
                hpa::MetricSpec {
                    type_: "Pods".into(),
                    pods: Some(hpa::PodsMetricSource {
                        metric: hpa::MetricIdentifier {
                            name: metric.into(),
                            selector: None,
                        },
                        target: hpa::MetricTarget {
                            type_: "AverageValue".into(),
                            average_value: Some(value(m.target)),
                            ..hpa::MetricTarget::default()
                        },
                    }),
                    ..hpa::MetricSpec::default()
                }
            };
            let resource = |res: &str| hpa::MetricSpec {
                type_: "Resource".into(),
                resource: Some(hpa::ResourceMetricSource {
                    name: res.into(),
                    target: hpa::MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(m.target.round() as i32),
                        ..hpa::MetricTarget::default()
                    },
                }),
                ..hpa::MetricSpec::default()
            };
            match &m.source {
                MetricSource::Cpu => resource("cpu"),
                MetricSource::Memory => resource("memory"),
                MetricSource::Rps => pods(
                    "http_requests_per_second",
                    "requests per second through capstan's proxy",
                    out,
                ),
                MetricSource::Inflight => pods(
                    "http_requests_in_flight",
                    "requests in flight through capstan's proxy",
                    out,
                ),
                MetricSource::Query(q) => {
                    out.skip(
                        format!("{ap}.metrics[{i}].query"),
                        format!("the HPA reads the External metric capstan_query_{i}, which needs an adapter that answers it with the PromQL {q:?}"),
                    );
                    hpa::MetricSpec {
                        type_: "External".into(),
                        external: Some(hpa::ExternalMetricSource {
                            metric: hpa::MetricIdentifier {
                                name: format!("capstan_query_{i}"),
                                selector: None,
                            },
                            target: hpa::MetricTarget {
                                type_: if m.average { "AverageValue" } else { "Value" }.into(),
                                average_value: m.average.then(|| value(m.target)),
                                value: (!m.average).then(|| value(m.target)),
                                ..hpa::MetricTarget::default()
                            },
                        }),
                        ..hpa::MetricSpec::default()
                    }
                }
            }
        })
        .collect();
    Some(hpa::HorizontalPodAutoscaler {
        metadata: meta(name, &stack.name, Some(name), opts),
        spec: Some(hpa::HorizontalPodAutoscalerSpec {
            scale_target_ref: hpa::CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: name.into(),
            },
            min_replicas: Some(i32::try_from(a.min.max(1)).unwrap_or(1)),
            max_replicas: i32::try_from(a.max).unwrap_or(i32::MAX),
            metrics: Some(metrics),
            behavior: Some(hpa::HorizontalPodAutoscalerBehavior {
                scale_up: Some(scaling_rules(&a.behavior.scale_up)),
                scale_down: Some(scaling_rules(&a.behavior.scale_down)),
            }),
        }),
        ..hpa::HorizontalPodAutoscaler::default()
    })
}

/// Settings with no Kubernetes equivalent on a service, reported.
fn unmappable(s: &Service, path: &str, argo: bool, out: &mut Export) {
    if s.deploy.restart_policy.condition != RestartCondition::Any {
        out.skip(
            format!("{path}.deploy.restart_policy.condition"),
            "a Deployment's pods always restart (restartPolicy: Always); use a Job for run-once work",
        );
    }
    if s.deploy.restart_policy.max_attempts.is_some() {
        out.skip(
            format!("{path}.deploy.restart_policy.max_attempts"),
            "a Deployment retries without limit, with the kubelet's back-off",
        );
    }
    if s.stop_signal != "SIGTERM" {
        out.skip(
            format!("{path}.stop_signal"),
            "pods are stopped with SIGTERM (the image's STOPSIGNAL applies)",
        );
    }
    if !s.depends_on.is_empty() {
        out.skip(
            format!("{path}.depends_on"),
            "Kubernetes starts pods in any order: wait in the program or an init container",
        );
    }
    if s.x.analysis.is_some() || (s.x.rollout.is_some() && !argo) {
        out.skip(
            format!("{path}.x-capstan.rollout"),
            "a canary judged on metrics needs Argo Rollouts (or Flagger); the Deployment rolls as update_config says",
        );
    }
    let px = &s.x.proxy;
    if *px != Default::default() {
        out.skip(
            format!("{path}.x-capstan.proxy"),
            "retries, timeouts and ejection belong to the ingress controller or a service mesh",
        );
    }
    if s.x.cold_start_timeout != crate::spec::ServiceX::default().cold_start_timeout {
        out.skip(
            format!("{path}.x-capstan.cold_start_timeout"),
            "no request is held while a pod starts (no scale from zero)",
        );
    }
    if !s.profiles.is_empty() {
        out.skip(format!("{path}.profiles"), "every service is exported");
    }
    let c = &s.container;
    for (set, key, why) in [
        (
            c.hostname.is_some(),
            "hostname",
            "pods are named by Kubernetes",
        ),
        (
            !c.extra_hosts.is_empty(),
            "extra_hosts",
            "use hostAliases by hand",
        ),
        (
            !c.cap_add.is_empty() || !c.cap_drop.is_empty(),
            "cap_add",
            "set securityContext.capabilities by hand",
        ),
        (
            c.privileged,
            "privileged",
            "set securityContext.privileged by hand, if the cluster allows it",
        ),
        (
            !c.ulimits.is_empty(),
            "ulimits",
            "pods have the node's limits",
        ),
        (
            !c.security_opt.is_empty(),
            "security_opt",
            "set securityContext by hand",
        ),
        (
            c.shm_size.is_some(),
            "shm_size",
            "mount an emptyDir with medium Memory at /dev/shm",
        ),
        (
            c.init == Some(true),
            "init",
            "no init process is added: use an image with one (tini)",
        ),
        (
            !c.tmpfs.is_empty(),
            "tmpfs",
            "mount emptyDir volumes with medium Memory",
        ),
        (
            !c.sysctls.is_empty(),
            "sysctls",
            "set securityContext.sysctls by hand, if the cluster allows them",
        ),
        (
            !c.dns.is_empty() || !c.dns_search.is_empty(),
            "dns",
            "set dnsConfig by hand",
        ),
        (
            !c.group_add.is_empty(),
            "group_add",
            "set securityContext.supplementalGroups by hand",
        ),
        (
            !c.devices.is_empty(),
            "devices",
            "devices need a device plugin",
        ),
        (
            c.mem_reservation.is_some(),
            "mem_reservation",
            "requests equal the limits here: set resources.requests.memory by hand",
        ),
        (
            c.cpu_shares.is_some(),
            "cpu_shares",
            "set resources.requests.cpu by hand",
        ),
        (
            c.networks.iter().any(|n| n.key != "default"),
            "networks",
            "pods share the cluster's network: restrict traffic with NetworkPolicies",
        ),
        (
            !c.files.is_empty(),
            "secrets",
            "secrets and configs are not exported yet: create a Secret or ConfigMap and mount it at the same path",
        ),
    ] {
        if set {
            out.skip(format!("{path}.{key}"), why);
        }
    }
    if s.deploy.resources.limits.pids.is_some() {
        out.skip(
            format!("{path}.deploy.resources.limits.pids"),
            "the pod PID limit is the kubelet's (--pod-max-pids)",
        );
    }
}

/// The manifests of a stack.
pub fn export(stack: &Stack, opts: &Options) -> Export {
    let mut out = Export::default();
    let mut claims = std::collections::BTreeSet::new();
    for (svc_name, s) in &stack.services {
        let name = dns_name(svc_name);
        let path = format!("services.{svc_name}");
        unmappable(s, &path, opts.argo_rollouts, &mut out);
        // The image: built ones need a registry the cluster pulls from.
        let image = super::image_of(
            s,
            &path,
            (format!("{}-{svc_name}", stack.name), &|i| {
                format!(
                    "the cluster cannot build: push the built image (named {i} here) to a registry it pulls from, and set image:"
                )
            }),
            (
                format!("{}-{svc_name}:latest", dns_name(&stack.name)),
                &|i| {
                    format!(
                        "a process service has no image: the manifest names {i}; build an image that runs this command and push it"
                    )
                },
            ),
            &mut out,
        );
        // Ports: the published ones through the Service (and an Ingress for
        // HTTP); `$PORT` becomes a fixed port in the pod.
        let port = s
            .ports
            .first()
            .map_or(DEFAULT_PORT, |p| container_port(p.target.as_deref()));
        let mut env: Vec<core::EnvVar> = vec![
            core::EnvVar {
                name: "PORT".into(),
                value: Some(port.to_string()),
                ..core::EnvVar::default()
            },
            core::EnvVar {
                name: "CAPSTAN_SERVICE".into(),
                value: Some(svc_name.clone()),
                ..core::EnvVar::default()
            },
        ];
        let (plain, secret): (BTreeMap<_, _>, BTreeMap<_, _>) = s
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|(k, _)| !looks_secret(k));
        let mut env_from = Vec::new();
        if !plain.is_empty() {
            let cm = format!("{name}-env");
            env_from.push(core::EnvFromSource {
                config_map_ref: Some(core::ConfigMapEnvSource {
                    name: cm.clone(),
                    optional: None,
                }),
                ..core::EnvFromSource::default()
            });
            out.add(
                format!("{name}-configmap"),
                core::ConfigMap {
                    metadata: meta(&cm, &stack.name, Some(svc_name), opts),
                    data: Some(plain),
                    ..core::ConfigMap::default()
                },
            );
        }
        if !secret.is_empty() {
            let sn = format!("{name}-secret");
            env_from.push(core::EnvFromSource {
                secret_ref: Some(core::SecretEnvSource {
                    name: sn.clone(),
                    optional: None,
                }),
                ..core::EnvFromSource::default()
            });
            out.add(
                format!("{name}-secret"),
                core::Secret {
                    metadata: meta(&sn, &stack.name, Some(svc_name), opts),
                    string_data: Some(secret),
                    type_: Some("Opaque".into()),
                    ..core::Secret::default()
                },
            );
        }
        env.sort_by(|a, b| a.name.cmp(&b.name));
        // Volumes.
        let mut volumes = Vec::new();
        let mut mounts = Vec::new();
        for (i, v) in s.volumes.iter().enumerate() {
            let vname = format!("v{i}");
            let source = match v.kind {
                VolumeKind::Volume => match &v.source {
                    Some(named) => {
                        let claim = dns_name(&format!("{}-{named}", stack.name));
                        claims.insert((claim.clone(), named.clone()));
                        core::Volume {
                            name: vname.clone(),
                            persistent_volume_claim: Some(
                                core::PersistentVolumeClaimVolumeSource {
                                    claim_name: claim,
                                    read_only: v.read_only.then_some(true),
                                },
                            ),
                            ..core::Volume::default()
                        }
                    }
                    None => core::Volume {
                        name: vname.clone(),
                        empty_dir: Some(core::EmptyDirVolumeSource::default()),
                        ..core::Volume::default()
                    },
                },
                VolumeKind::Tmpfs => core::Volume {
                    name: vname.clone(),
                    empty_dir: Some(core::EmptyDirVolumeSource {
                        medium: Some("Memory".into()),
                        ..core::EmptyDirVolumeSource::default()
                    }),
                    ..core::Volume::default()
                },
                VolumeKind::Bind => {
                    let host = v.source.clone().unwrap_or_default();
                    out.skip(
                        format!("{path}.volumes[{i}]"),
                        format!("a bind mount of {host}: exported as a hostPath, which is the node's disk, not this machine's; use a PersistentVolumeClaim or a ConfigMap"),
                    );
                    core::Volume {
                        name: vname.clone(),
                        host_path: Some(core::HostPathVolumeSource {
                            path: host,
                            type_: None,
                        }),
                        ..core::Volume::default()
                    }
                }
            };
            volumes.push(source);
            mounts.push(core::VolumeMount {
                name: vname,
                mount_path: v.target.clone(),
                read_only: v.read_only.then_some(true),
                ..core::VolumeMount::default()
            });
        }
        // Resources.
        let lim = &s.deploy.resources.limits;
        let mut limits = BTreeMap::new();
        if let Some(c) = lim.cpus {
            limits.insert("cpu".to_owned(), cpu_quantity(c));
        }
        if let Some(m) = lim.memory {
            limits.insert("memory".to_owned(), memory_quantity(m));
        }
        let resources = (!limits.is_empty()).then(|| core::ResourceRequirements {
            // Requests as the limits: the same guarantees as on one machine.
            requests: Some(limits.clone()),
            limits: Some(limits),
            ..core::ResourceRequirements::default()
        });
        let probe = probe(s, port);
        let container = core::Container {
            name: name.clone(),
            image: Some(image),
            command: s.entrypoint.as_ref().map(argv),
            args: s.command.as_ref().map(argv),
            working_dir: s.working_dir.clone(),
            env: Some(env),
            env_from: (!env_from.is_empty()).then_some(env_from),
            ports: Some(vec![core::ContainerPort {
                name: Some("http".into()),
                container_port: i32::from(port),
                protocol: Some("TCP".into()),
                ..core::ContainerPort::default()
            }]),
            resources,
            readiness_probe: probe.clone(),
            liveness_probe: probe,
            volume_mounts: (!mounts.is_empty()).then_some(mounts),
            image_pull_policy: s.container.pull_policy.as_deref().map(|p| {
                match p {
                    "always" => "Always",
                    "never" => "Never",
                    _ => "IfNotPresent",
                }
                .to_owned()
            }),
            security_context: (s.container.user.is_some() || s.container.read_only).then(|| {
                core::SecurityContext {
                    run_as_user: s
                        .container
                        .user
                        .as_deref()
                        .and_then(|u| u.split(':').next()?.parse().ok()),
                    read_only_root_filesystem: s.container.read_only.then_some(true),
                    ..core::SecurityContext::default()
                }
            }),
            ..core::Container::default()
        };
        if s.container.user.as_deref().is_some_and(|u| {
            u.split(':')
                .next()
                .is_some_and(|x| x.parse::<i64>().is_err())
        }) {
            out.skip(format!("{path}.user"), "runAsUser takes a numeric user id");
        }
        let (strategy, min_ready) = strategy(s, &path, &mut out);
        let autoscaled = s.x.autoscale.is_some();
        let deployment = apps::Deployment {
            metadata: meta(&name, &stack.name, Some(svc_name), opts),
            spec: Some(apps::DeploymentSpec {
                // With an autoscaler the HPA owns the count.
                replicas: (!autoscaled).then(|| i32::try_from(s.deploy.replicas).unwrap_or(1)),
                selector: LabelSelector {
                    match_labels: Some(selector(svc_name)),
                    ..LabelSelector::default()
                },
                strategy: Some(strategy),
                min_ready_seconds: min_ready,
                template: core::PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some({
                            let mut l = selector(svc_name);
                            l.insert("app.kubernetes.io/part-of".into(), dns_name(&stack.name));
                            l
                        }),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(core::PodSpec {
                        containers: vec![container],
                        termination_grace_period_seconds: Some(i64::from(secs(
                            &s.stop_grace_period,
                        ))),
                        volumes: (!volumes.is_empty()).then_some(volumes),
                        ..core::PodSpec::default()
                    }),
                },
                ..apps::DeploymentSpec::default()
            }),
            ..apps::Deployment::default()
        };
        out.add(format!("{name}-deployment"), deployment);
        // Published ports, and exposed ones (reachable inside the cluster
        // by the service's name, as on a compose network).
        let mut ports: Vec<core::ServicePort> = s
            .ports
            .iter()
            .map(|p| core::ServicePort {
                name: Some(format!("p{}", p.published)),
                port: i32::from(p.published),
                target_port: Some(IntOrString::Int(i32::from(container_port(
                    p.target.as_deref(),
                )))),
                protocol: Some(p.protocol.to_ascii_uppercase()),
                app_protocol: p.app_protocol.clone().or_else(|| {
                    (s.proxy_protocol() == Protocol::H2c).then(|| "kubernetes.io/h2c".into())
                }),
                ..core::ServicePort::default()
            })
            .collect();
        for (i, e) in s.expose.iter().enumerate() {
            let (num, proto) = e.split_once('/').unwrap_or((e, "tcp"));
            match num.parse::<u16>() {
                Ok(n) if !ports.iter().any(|p| p.port == i32::from(n)) => {
                    ports.push(core::ServicePort {
                        name: Some(format!("p{n}")),
                        port: i32::from(n),
                        target_port: Some(IntOrString::Int(i32::from(n))),
                        protocol: Some(proto.to_ascii_uppercase()),
                        ..core::ServicePort::default()
                    })
                }
                Ok(_) => {}
                Err(_) => out.skip(
                    format!("{path}.expose[{i}]"),
                    format!("{e:?}: only single ports are exported"),
                ),
            }
        }
        if !ports.is_empty() {
            for (i, p) in s.ports.iter().enumerate() {
                if p.host_ip.is_some() {
                    out.skip(
                        format!("{path}.ports[{i}]"),
                        "a host address has no meaning in a cluster: the Service and Ingress carry the port",
                    );
                }
            }
            out.add(
                format!("{name}-service"),
                core::Service {
                    metadata: meta(&name, &stack.name, Some(svc_name), opts),
                    spec: Some(core::ServiceSpec {
                        selector: Some(selector(svc_name)),
                        ports: Some(ports),
                        ..core::ServiceSpec::default()
                    }),
                    ..core::Service::default()
                },
            );
            if s.proxy_protocol() != Protocol::Tcp && !s.ports.is_empty() {
                let first = s.ports[0].published;
                out.add(
                    format!("{name}-ingress"),
                    net::Ingress {
                        metadata: meta(&name, &stack.name, Some(svc_name), opts),
                        spec: Some(net::IngressSpec {
                            rules: Some(vec![net::IngressRule {
                                host: None,
                                http: Some(net::HTTPIngressRuleValue {
                                    paths: vec![net::HTTPIngressPath {
                                        path: Some("/".into()),
                                        path_type: "Prefix".into(),
                                        backend: net::IngressBackend {
                                            service: Some(net::IngressServiceBackend {
                                                name: name.clone(),
                                                port: Some(net::ServiceBackendPort {
                                                    number: Some(i32::from(first)),
                                                    name: None,
                                                }),
                                            }),
                                            resource: None,
                                        },
                                    }],
                                }),
                            }]),
                            ..net::IngressSpec::default()
                        }),
                        ..net::Ingress::default()
                    },
                );
            }
        }
        if let Some(h) = autoscaler(&name, stack, s, &path, opts, &mut out) {
            out.add(format!("{name}-hpa"), h);
        }
    }
    for (claim, named) in claims {
        out.add(
            format!("{claim}-persistentvolumeclaim"),
            core::PersistentVolumeClaim {
                metadata: meta(&claim, &stack.name, None, opts),
                spec: Some(core::PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    resources: Some(core::VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([(
                            "storage".to_owned(),
                            Quantity("1Gi".into()),
                        )])),
                        ..core::VolumeResourceRequirements::default()
                    }),
                    ..core::PersistentVolumeClaimSpec::default()
                }),
                ..core::PersistentVolumeClaim::default()
            },
        );
        out.skip(
            format!("volumes.{named}"),
            "a named volume becomes a 1Gi ReadWriteOnce claim on the cluster's default storage class: set the size",
        );
    }
    if opts.prometheus_operator {
        super::operators::pod_monitors(stack, opts, &mut out);
        super::operators::prometheus_rules(stack, opts, &mut out);
    } else {
        for (name, s) in &stack.services {
            if !s.x.metrics.disable {
                out.skip(
                    format!("services.{name}.x-capstan.metrics"),
                    "nothing scrapes the pods: export with --prometheus-operator for a PodMonitor, or configure your Prometheus",
                );
            }
        }
    }
    super::stack_settings(stack, &mut out, opts.prometheus_operator);
    if opts.argo_rollouts {
        super::operators::argo_rollouts(stack, opts, &mut out);
    }
    if !stack.networks.is_empty() {
        out.skip(
            "networks",
            "pods share the cluster's network; restrict traffic with NetworkPolicies",
        );
    }
    out.unmapped.sort();
    out.unmapped.dedup();
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;

    use super::*;

    fn stack(yaml: &str) -> Stack {
        crate::spec::parse_text(
            yaml,
            "capstan.yaml",
            Path::new("/srv/app"),
            "app",
            BTreeMap::new(),
            &crate::spec::LoadOptions::default(),
        )
        .unwrap()
        .0
    }

    /// Each exported object, typed again: nothing lost on the way through
    /// k8s-openapi's types.
    fn round_trip(e: &Export) {
        for (name, o) in &e.objects {
            let text = crate::export::yaml(o);
            let kind = o["kind"].as_str().unwrap();
            let back: serde_json::Value = match kind {
                "Deployment" => {
                    serde_json::to_value(serde_saphyr::from_str::<Deployment>(&text).unwrap())
                }
                "Service" => {
                    serde_json::to_value(serde_saphyr::from_str::<core::Service>(&text).unwrap())
                }
                "Ingress" => {
                    serde_json::to_value(serde_saphyr::from_str::<net::Ingress>(&text).unwrap())
                }
                "ConfigMap" => {
                    serde_json::to_value(serde_saphyr::from_str::<core::ConfigMap>(&text).unwrap())
                }
                "Secret" => {
                    serde_json::to_value(serde_saphyr::from_str::<core::Secret>(&text).unwrap())
                }
                "PersistentVolumeClaim" => serde_json::to_value(
                    serde_saphyr::from_str::<core::PersistentVolumeClaim>(&text).unwrap(),
                ),
                "HorizontalPodAutoscaler" => serde_json::to_value(
                    serde_saphyr::from_str::<HorizontalPodAutoscaler>(&text).unwrap(),
                ),
                "PodMonitor" | "PrometheusRule" | "Rollout" | "AnalysisTemplate" => continue,
                other => panic!("{name}: unexpected kind {other}"),
            }
            .unwrap();
            assert_eq!(
                &back, o,
                "{name} changed through the typed round trip:\n{text}"
            );
        }
    }

    const FULL: &str = r#"
name: shop
services:
  api:
    image: registry.local/api:2.1
    command: ["serve", "--port", "9000"]
    environment: {LOG_LEVEL: info, DB_PASSWORD: hunter2, API_TOKEN: t0k}
    ports: ["80:9000"]
    volumes: ["data:/var/lib/api", "./conf:/etc/api:ro", {type: tmpfs, target: /tmp}]
    healthcheck:
      test: ["CMD", "curl", "-f", "http://localhost:9000/healthz"]
      interval: 5s
      timeout: 2s
      retries: 4
      start_period: 10s
    stop_grace_period: 20s
    deploy:
      replicas: 2
      resources: {limits: {cpus: "1.5", memory: 256m}}
      update_config: {parallelism: 2, order: stop-first, monitor: 30s, failure_action: pause}
    x-capstan:
      autoscale:
        min: 2
        max: 10
        metrics: [{cpu: 70%}, {rps: 50}]
        behavior:
          scaleUp:
            stabilizationWindowSeconds: 15
            selectPolicy: Min
            policies: [{type: Pods, value: 2, periodSeconds: 30}]
          scaleDown:
            stabilizationWindowSeconds: 120
            policies: [{type: Percent, value: 50, periodSeconds: 60}]
  cache:
    image: redis:7
    expose: ["6379"]
    x-capstan:
      healthcheck: {tcp: 6379, interval: 3s}
      protocol: tcp
volumes:
  data:
"#;

    #[test]
    fn probes_and_the_autoscaler_follow_the_stack_field_by_field() {
        let st = stack(FULL);
        let e = export(&st, &Options::default());
        round_trip(&e);
        let get = |name: &str| &e.objects.iter().find(|(n, _)| n == name).unwrap().1;
        let d: Deployment = serde_json::from_value(get("api-deployment").clone()).unwrap();
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, None, "the HPA owns the count");
        let ru = spec.strategy.unwrap().rolling_update.unwrap();
        assert_eq!(ru.max_surge, Some(IntOrString::Int(0)), "stop-first");
        assert_eq!(
            ru.max_unavailable,
            Some(IntOrString::Int(2)),
            "parallelism 2"
        );
        assert_eq!(spec.min_ready_seconds, Some(30), "monitor");
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.termination_grace_period_seconds, Some(20));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.local/api:2.1"));
        assert_eq!(
            c.args.as_deref(),
            Some(&["serve".to_owned(), "--port".into(), "9000".into()][..])
        );
        let hc = st.services["api"].healthcheck.as_ref().unwrap();
        let p = c.readiness_probe.as_ref().unwrap();
        assert_eq!(
            p.exec.as_ref().unwrap().command.as_deref(),
            Some(
                &[
                    "curl".to_owned(),
                    "-f".into(),
                    "http://localhost:9000/healthz".into()
                ][..]
            )
        );
        assert_eq!(p.period_seconds, Some(hc.interval.0.as_secs() as i32));
        assert_eq!(p.timeout_seconds, Some(hc.timeout.0.as_secs() as i32));
        assert_eq!(p.failure_threshold, Some(hc.retries as i32));
        assert_eq!(p.initial_delay_seconds, Some(10));
        assert_eq!(c.liveness_probe.as_ref(), Some(p));
        let r = c.resources.as_ref().unwrap();
        assert_eq!(r.limits.as_ref().unwrap()["cpu"], Quantity("1500m".into()));
        assert_eq!(
            r.limits.as_ref().unwrap()["memory"],
            Quantity("256Mi".into())
        );
        // Secrets apart from the rest of the environment.
        assert_eq!(get("api-secret")["stringData"]["DB_PASSWORD"], "hunter2");
        assert_eq!(get("api-secret")["stringData"]["API_TOKEN"], "t0k");
        assert_eq!(
            get("api-configmap")["data"],
            serde_json::json!({"LOG_LEVEL": "info"})
        );
        // The autoscaler, field by field.
        let a = st.services["api"].x.autoscale.as_ref().unwrap();
        let h: HorizontalPodAutoscaler = serde_json::from_value(get("api-hpa").clone()).unwrap();
        let hs = h.spec.unwrap();
        assert_eq!(hs.min_replicas, Some(a.min as i32));
        assert_eq!(hs.max_replicas, a.max as i32);
        assert_eq!(hs.scale_target_ref.name, "api");
        let m = hs.metrics.unwrap();
        assert_eq!(m[0].resource.as_ref().unwrap().name, "cpu");
        assert_eq!(
            m[0].resource.as_ref().unwrap().target.average_utilization,
            Some(70)
        );
        assert_eq!(
            m[1].pods.as_ref().unwrap().metric.name,
            "http_requests_per_second"
        );
        assert_eq!(
            m[1].pods.as_ref().unwrap().target.average_value,
            Some(Quantity("50".into()))
        );
        let b = hs.behavior.unwrap();
        for (got, want) in [
            (b.scale_up.unwrap(), &a.behavior.scale_up),
            (b.scale_down.unwrap(), &a.behavior.scale_down),
        ] {
            assert_eq!(
                got.stabilization_window_seconds,
                Some(want.stabilization.0.as_secs() as i32)
            );
            let policies = got.policies.unwrap();
            assert_eq!(policies.len(), want.policies.len());
            for (g, w) in policies.iter().zip(&want.policies) {
                assert_eq!(g.value, w.value as i32);
                assert_eq!(g.period_seconds, w.period.0.as_secs() as i32);
                assert_eq!(
                    g.type_,
                    if w.kind == PolicyKind::Pods {
                        "Pods"
                    } else {
                        "Percent"
                    }
                );
            }
        }
        assert_eq!(
            get("api-hpa")["spec"]["behavior"]["scaleUp"]["selectPolicy"],
            "Min"
        );
        // TCP probe on the cache; its exposed port makes a Service, no Ingress.
        let d: Deployment = serde_json::from_value(get("cache-deployment").clone()).unwrap();
        let c = &d.spec.unwrap().template.spec.unwrap().containers[0];
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .unwrap()
                .tcp_socket
                .as_ref()
                .unwrap()
                .port,
            IntOrString::Int(6379)
        );
        assert_eq!(get("cache-service")["spec"]["ports"][0]["port"], 6379);
        assert!(!e.objects.iter().any(|(n, _)| n == "cache-ingress"));
        assert_eq!(
            get("api-ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"]
                ["number"],
            80
        );
        assert_eq!(
            get("shop-data-persistentvolumeclaim")["spec"]["accessModes"][0],
            "ReadWriteOnce"
        );
        // What does not map is said, with its path.
        let paths: Vec<&str> = e.unmapped.iter().map(|u| u.path.as_str()).collect();
        for want in [
            "services.api.volumes[1]",
            "services.api.x-capstan.autoscale.metrics[1]",
            "services.api.x-capstan.autoscale.interval",
            "volumes.data",
        ] {
            assert!(paths.contains(&want), "{want} not reported: {paths:?}");
        }
    }

    #[test]
    fn the_examples_export_as_before() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let root = root.canonicalize().unwrap();
        for ex in ["hello", "autoscale", "flask"] {
            let loaded = crate::spec::load(
                &root.join(ex).join("capstan.yaml"),
                &crate::spec::LoadOptions::default(),
            )
            .unwrap();
            let e = export(
                &loaded.stack,
                &Options {
                    namespace: Some("demo".into()),
                    ..Options::default()
                },
            );
            round_trip(&e);
            let mut text = e.to_yaml();
            text.push_str("# not mapped:\n");
            for u in &e.unmapped {
                text.push_str(&format!("# {}: {}\n", u.path, u.why));
            }
            let text = text.replace(&root.display().to_string(), "[examples]");
            insta::assert_snapshot!(format!("kubernetes_{ex}"), text);
        }
    }

    #[test]
    fn canaries_become_argo_rollouts_and_scrapes_pod_monitors() {
        let st = stack(
            r#"
services:
  api:
    image: registry.local/api:2.1
    ports: ["80:9000"]
    x-capstan:
      metrics: {path: /stats, interval: 10s}
      rollout:
        strategy: canary
        steps: [{weight: 10}, {pause: 1m}, {weight: 50}, {pause: {}}]
        analysis:
          interval: 30s
          failure_limit: 3
          checks:
            - {check: success-rate, min: 0.99}
            - {check: latency-p99, max: 0.5}
            - {check: errors-vs-baseline}
            - {query: 'sum(queue_depth{ {{canary}} })', max: 10}
"#,
        );
        let e = export(
            &st,
            &Options {
                prometheus_operator: true,
                argo_rollouts: true,
                ..Options::default()
            },
        );
        round_trip(&e);
        let get = |name: &str| {
            &e.objects
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("no {name}"))
                .1
        };
        let r = get("api-rollout");
        assert_eq!(r["apiVersion"], "argoproj.io/v1alpha1");
        assert_eq!(r["spec"]["workloadRef"]["name"], "api");
        assert_eq!(
            r["spec"]["strategy"]["canary"]["steps"],
            serde_json::json!([{"setWeight": 10}, {"pause": {"duration": "1m"}}, {"setWeight": 50}, {"pause": {}}])
        );
        let t = get("api-analysistemplate");
        let metrics = t["spec"]["metrics"].as_array().unwrap();
        assert_eq!(
            metrics.len(),
            3,
            "the sequential check is reported, not mapped: {t}"
        );
        assert_eq!(metrics[0]["successCondition"], "result[0] >= 0.99");
        assert_eq!(
            metrics[0]["failureLimit"], 2,
            "capstan fails at the limit, Argo after it"
        );
        assert_eq!(metrics[1]["successCondition"], "result[0] <= 0.5");
        assert_eq!(
            metrics[2]["provider"]["prometheus"]["query"],
            "sum(queue_depth{ service=\"api\",rollouts_pod_template_hash=\"{{args.canary-hash}}\" })"
        );
        assert!(
            e.unmapped
                .iter()
                .any(|u| u.path == "services.api.x-capstan.rollout.analysis.checks[2]")
        );
        assert!(
            !e.unmapped
                .iter()
                .any(|u| u.path == "services.api.x-capstan.rollout")
        );
        let pm = get("api-podmonitor");
        assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["path"], "/stats");
        assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["interval"], "10s");
    }

    #[test]
    fn http2_services_say_so_in_app_protocol() {
        let st = stack(
            r#"
services:
  rpc:
    image: registry.local/rpc:1
    ports: ["50051:50051"]
    x-capstan: {protocol: grpc}
  web:
    image: registry.local/web:1
    ports: [{published: 80, target: "8080", app_protocol: http}]
"#,
        );
        let e = export(&st, &Options::default());
        round_trip(&e);
        let port = |name: &str| {
            let svc = &e.objects.iter().find(|(n, _)| n == name).unwrap().1;
            svc["spec"]["ports"][0].clone()
        };
        assert_eq!(port("rpc-service")["appProtocol"], "kubernetes.io/h2c");
        assert_eq!(port("web-service")["appProtocol"], "http");
        assert!(e.objects.iter().any(|(n, _)| n == "rpc-ingress"));
    }

    #[test]
    fn names_and_quantities() {
        assert_eq!(dns_name("My_App.v2"), "my-app-v2");
        assert_eq!(cpu_quantity(0.25), Quantity("250m".into()));
        assert_eq!(memory_quantity(3 << 30), Quantity("3Gi".into()));
        assert_eq!(memory_quantity(1000), Quantity("1000".into()));
        assert!(
            looks_secret("db_password")
                && looks_secret("GITHUB_TOKEN")
                && !looks_secret("LOG_LEVEL")
        );
    }
}
