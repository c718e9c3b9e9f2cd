//! Parse throughput in MB/s on one core. Input: a file given as the first argument
//! (e.g. a saved node_exporter scrape), or a generated node_exporter-shaped page.
//! `cargo run --release -p capstan-expfmt --example throughput [FILE] [openmetrics]`

use std::time::{Duration, Instant};

use capstan_expfmt::{Entry, Format, Parser};

/// A page shaped like node_exporter's: HELP/TYPE, CPU modes, filesystems,
/// network devices, a histogram; about 1,500 samples.
fn generated() -> String {
    let mut s = String::new();
    s.push_str("# HELP node_cpu_seconds_total Seconds the CPUs spent in each mode.\n# TYPE node_cpu_seconds_total counter\n");
    for cpu in 0..32 {
        for (i, mode) in [
            "idle", "iowait", "irq", "nice", "softirq", "steal", "system", "user",
        ]
        .iter()
        .enumerate()
        {
            s.push_str(&format!(
                "node_cpu_seconds_total{{cpu=\"{cpu}\",mode=\"{mode}\"}} {}.{}\n",
                123456 + cpu * 7 + i,
                37 + i
            ));
        }
    }
    for metric in [
        "node_filesystem_avail_bytes",
        "node_filesystem_size_bytes",
        "node_filesystem_files_free",
    ] {
        s.push_str(&format!(
            "# HELP {metric} Filesystem figure.\n# TYPE {metric} gauge\n"
        ));
        for fs in 0..40 {
            s.push_str(&format!("{metric}{{device=\"/dev/vd{fs}\",fstype=\"ext4\",mountpoint=\"/srv/data{fs}\"}} {}e+09\n", 1.5 + fs as f64));
        }
    }
    for metric in [
        "node_network_receive_bytes_total",
        "node_network_transmit_bytes_total",
        "node_network_receive_packets_total",
        "node_network_transmit_packets_total",
    ] {
        s.push_str(&format!(
            "# HELP {metric} Network device statistic.\n# TYPE {metric} counter\n"
        ));
        for dev in 0..60 {
            s.push_str(&format!(
                "{metric}{{device=\"veth{dev:04x}\"}} {}\n",
                987654321 + dev * 13
            ));
        }
    }
    s.push_str("# HELP http_request_duration_seconds Latency.\n# TYPE http_request_duration_seconds histogram\n");
    for handler in 0..40 {
        let mut c = 0;
        for le in [
            "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf",
        ] {
            c += 3;
            s.push_str(&format!("http_request_duration_seconds_bucket{{handler=\"/api/v1/h{handler}\",le=\"{le}\"}} {c}\n"));
        }
        s.push_str(&format!("http_request_duration_seconds_sum{{handler=\"/api/v1/h{handler}\"}} 17.25\nhttp_request_duration_seconds_count{{handler=\"/api/v1/h{handler}\"}} {c}\n"));
    }
    s
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let format = if args.iter().any(|a| a == "openmetrics") {
        Format::OpenMetrics
    } else {
        Format::Text
    };
    let mut page = match args.get(1).filter(|a| *a != "openmetrics") {
        Some(f) => std::fs::read_to_string(f).expect("readable input"),
        None => generated(),
    };
    if format == Format::OpenMetrics && !page.contains("# EOF") {
        // OpenMetrics names counter families without `_total`.
        page = page
            .lines()
            .map(|l| {
                if l.starts_with("# HELP ") || l.starts_with("# TYPE ") {
                    l.replacen("_total ", " ", 1)
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        page.push_str("\n# EOF\n");
    }
    let samples = Parser::new(&page, format)
        .filter(|e| matches!(e, Ok(Entry::Sample(_))))
        .count();
    let mut bytes = 0usize;
    let mut label_bytes = 0usize;
    let start = Instant::now();
    let mut rounds = 0;
    while start.elapsed() < Duration::from_secs(3) {
        for e in Parser::new(&page, format) {
            // Read every label as a scraper does, so the figure includes unescaping.
            if let Entry::Sample(s) = e.expect("the page parses") {
                for l in s.labels() {
                    label_bytes += l.map(|(n, v)| n.len() + v.len()).unwrap_or(0);
                }
            }
        }
        bytes += page.len();
        rounds += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{:?}: {} bytes, {} samples per page, {rounds} pages in {secs:.2}s: {:.0} MB/s, {:.1} M samples/s (labels read: {label_bytes} bytes)",
        format,
        page.len(),
        samples,
        bytes as f64 / secs / 1e6,
        (samples * rounds) as f64 / secs / 1e6
    );
}
