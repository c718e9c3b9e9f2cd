//! Host metrics with node_exporter's names and labels, read from /proc and /sys:
//! CPU by mode, load, memory, filesystems, network and disk I/O, the common
//! dashboard set.

use std::fs;

use super::Exposition;

/// USER_HZ: /proc/stat counts CPU time in hundredths of a second.
const TICKS: f64 = 100.0;

pub fn collect() -> String {
    let mut e = Exposition::default();
    cpu(&mut e);
    load(&mut e);
    memory(&mut e);
    filesystems(&mut e);
    network(&mut e);
    disks(&mut e);
    e.single(
        "node_time_seconds",
        "gauge",
        "System time in seconds since epoch (1970).",
        crate::events::now_ms() as f64 / 1000.0,
    );
    e.finish()
}

fn cpu(e: &mut Exposition) {
    let Ok(stat) = fs::read_to_string("/proc/stat") else {
        return;
    };
    const MODES: [&str; 8] = [
        "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
    ];
    e.family(
        "node_cpu_seconds_total",
        "counter",
        "Seconds the CPUs spent in each mode.",
    );
    for line in stat.lines() {
        let mut f = line.split_ascii_whitespace();
        let Some(name) = f.next() else { continue };
        let Some(cpu) = name.strip_prefix("cpu").filter(|c| !c.is_empty()) else {
            continue;
        };
        for (mode, v) in MODES.iter().zip(f) {
            if let Ok(t) = v.parse::<f64>() {
                e.sample(
                    "node_cpu_seconds_total",
                    &[("cpu", cpu), ("mode", mode)],
                    t / TICKS,
                );
            }
        }
    }
    for line in stat.lines() {
        let mut f = line.split_ascii_whitespace();
        let (Some(k), Some(v)) = (f.next(), f.next().and_then(|v| v.parse::<f64>().ok())) else {
            continue;
        };
        match k {
            "ctxt" => e.single(
                "node_context_switches_total",
                "counter",
                "Total number of context switches.",
                v,
            ),
            "btime" => e.single(
                "node_boot_time_seconds",
                "gauge",
                "Node boot time, in unixtime.",
                v,
            ),
            "procs_running" => e.single(
                "node_procs_running",
                "gauge",
                "Number of processes in runnable state.",
                v,
            ),
            "procs_blocked" => e.single(
                "node_procs_blocked",
                "gauge",
                "Number of processes blocked waiting for I/O to complete.",
                v,
            ),
            _ => {}
        }
    }
}

fn load(e: &mut Exposition) {
    let Ok(text) = fs::read_to_string("/proc/loadavg") else {
        return;
    };
    let v: Vec<f64> = text
        .split_ascii_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    for (name, i, help) in [
        ("node_load1", 0, "1m load average."),
        ("node_load5", 1, "5m load average."),
        ("node_load15", 2, "15m load average."),
    ] {
        if let Some(x) = v.get(i) {
            e.single(name, "gauge", help, *x);
        }
    }
}

fn memory(e: &mut Exposition) {
    let Ok(text) = fs::read_to_string("/proc/meminfo") else {
        return;
    };
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let mut f = rest.split_ascii_whitespace();
        let Some(v) = f.next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        let kb = f.next() == Some("kB");
        // node_exporter's naming: parentheses become underscores, `_bytes` for kB values.
        let key: String = key
            .chars()
            .map(|c| if c == '(' || c == ')' { '_' } else { c })
            .collect();
        let key = key.trim_end_matches('_');
        let name = if kb {
            format!("node_memory_{key}_bytes")
        } else {
            format!("node_memory_{key}")
        };
        e.single(
            &name,
            "gauge",
            &format!("Memory information field {key}."),
            if kb { v * 1024.0 } else { v },
        );
    }
}

fn filesystems(e: &mut Exposition) {
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    const IGNORED: [&str; 16] = [
        "proc",
        "sysfs",
        "cgroup",
        "cgroup2",
        "devpts",
        "mqueue",
        "debugfs",
        "tracefs",
        "securityfs",
        "pstore",
        "bpf",
        "fusectl",
        "configfs",
        "hugetlbfs",
        "autofs",
        "binfmt_misc",
    ];
    struct Fs {
        device: String,
        mountpoint: String,
        fstype: String,
        figures: [f64; 5],
    }
    let mut rows = Vec::new();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        let [device, mountpoint, fstype, ..] = f[..] else {
            continue;
        };
        if IGNORED.contains(&fstype)
            || mountpoint.starts_with("/proc")
            || mountpoint.starts_with("/sys")
        {
            continue;
        }
        let Ok(st) = nix::sys::statvfs::statvfs(mountpoint) else {
            continue;
        };
        let bs = st.fragment_size() as f64;
        rows.push(Fs {
            device: device.to_owned(),
            mountpoint: mountpoint.to_owned(),
            fstype: fstype.to_owned(),
            figures: [
                st.blocks() as f64 * bs,
                st.blocks_free() as f64 * bs,
                st.blocks_available() as f64 * bs,
                st.files() as f64,
                st.files_free() as f64,
            ],
        });
    }
    let families = [
        ("node_filesystem_size_bytes", "Filesystem size in bytes."),
        (
            "node_filesystem_free_bytes",
            "Filesystem free space in bytes.",
        ),
        (
            "node_filesystem_avail_bytes",
            "Filesystem space available to non-root users in bytes.",
        ),
        ("node_filesystem_files", "Filesystem total file nodes."),
        (
            "node_filesystem_files_free",
            "Filesystem total free file nodes.",
        ),
    ];
    for (i, (name, help)) in families.into_iter().enumerate() {
        e.family(name, "gauge", help);
        for r in &rows {
            e.sample(
                name,
                &[
                    ("device", &r.device),
                    ("fstype", &r.fstype),
                    ("mountpoint", &r.mountpoint),
                ],
                r.figures[i],
            );
        }
    }
}

/// Counter families over per-device rows: (name, column, scale, help) each.
fn device_table(
    e: &mut Exposition,
    rows: &[(String, Vec<f64>)],
    families: &[(&str, usize, f64, &str)],
) {
    for &(name, i, scale, help) in families {
        e.family(name, "counter", help);
        for (dev, v) in rows {
            if let Some(x) = v.get(i) {
                e.sample(name, &[("device", dev)], x * scale);
            }
        }
    }
}

fn network(e: &mut Exposition) {
    let Ok(text) = fs::read_to_string("/proc/net/dev") else {
        return;
    };
    let rows: Vec<(String, Vec<f64>)> = text
        .lines()
        .skip(2)
        .filter_map(|l| {
            let (dev, rest) = l.split_once(':')?;
            Some((
                dev.trim().to_owned(),
                rest.split_ascii_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect(),
            ))
        })
        .collect();
    device_table(
        e,
        &rows,
        &[
            (
                "node_network_receive_bytes_total",
                0,
                1.0,
                "Network device statistic receive_bytes.",
            ),
            (
                "node_network_receive_packets_total",
                1,
                1.0,
                "Network device statistic receive_packets.",
            ),
            (
                "node_network_receive_errs_total",
                2,
                1.0,
                "Network device statistic receive_errs.",
            ),
            (
                "node_network_receive_drop_total",
                3,
                1.0,
                "Network device statistic receive_drop.",
            ),
            (
                "node_network_transmit_bytes_total",
                8,
                1.0,
                "Network device statistic transmit_bytes.",
            ),
            (
                "node_network_transmit_packets_total",
                9,
                1.0,
                "Network device statistic transmit_packets.",
            ),
            (
                "node_network_transmit_errs_total",
                10,
                1.0,
                "Network device statistic transmit_errs.",
            ),
            (
                "node_network_transmit_drop_total",
                11,
                1.0,
                "Network device statistic transmit_drop.",
            ),
        ],
    );
}

fn disks(e: &mut Exposition) {
    let Ok(text) = fs::read_to_string("/proc/diskstats") else {
        return;
    };
    let rows: Vec<(String, Vec<f64>)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_ascii_whitespace().collect();
            let dev = f.get(2)?.to_string();
            if dev.starts_with("loop") || dev.starts_with("ram") {
                return None;
            }
            Some((dev, f[3..].iter().filter_map(|v| v.parse().ok()).collect()))
        })
        .collect();
    // Fields after the device name: reads, merged, sectors read, ms reading, writes, merged, sectors written, ms writing, in progress, ms doing I/O.
    device_table(
        e,
        &rows,
        &[
            (
                "node_disk_reads_completed_total",
                0,
                1.0,
                "The total number of reads completed successfully.",
            ),
            (
                "node_disk_read_bytes_total",
                2,
                512.0,
                "The total number of bytes read successfully.",
            ),
            (
                "node_disk_read_time_seconds_total",
                3,
                0.001,
                "The total number of seconds spent by all reads.",
            ),
            (
                "node_disk_writes_completed_total",
                4,
                1.0,
                "The total number of writes completed successfully.",
            ),
            (
                "node_disk_written_bytes_total",
                6,
                512.0,
                "The total number of bytes written successfully.",
            ),
            (
                "node_disk_write_time_seconds_total",
                7,
                0.001,
                "This is the total number of seconds spent by all writes.",
            ),
            (
                "node_disk_io_time_seconds_total",
                9,
                0.001,
                "Total seconds spent doing I/Os.",
            ),
        ],
    );
}

#[cfg(test)]
mod tests {
    use capstan_expfmt::{Entry, Format, Parser};

    #[test]
    fn host_metrics_parse_and_have_the_common_set() {
        let text = super::collect();
        let mut names = std::collections::BTreeSet::new();
        for e in Parser::new(&text, Format::Text) {
            if let Entry::Sample(s) = e.unwrap() {
                names.insert(s.name.to_owned());
            }
        }
        for want in [
            "node_cpu_seconds_total",
            "node_load1",
            "node_memory_MemTotal_bytes",
            "node_memory_MemAvailable_bytes",
            "node_network_receive_bytes_total",
            "node_filesystem_avail_bytes",
            "node_time_seconds",
        ] {
            assert!(names.contains(want), "{want} missing");
        }
    }
}
