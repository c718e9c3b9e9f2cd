//! The canary judge's error comparison, simulated: how often it raises a
//! false alarm when canary and baseline behave alike and it is looked at
//! after every interval, beside the usual alternative (a fixed two-sample
//! z-test at the same level, re-checked each interval until it trips), and
//! how fast it finds a real regression.
//!
//! Usage: cargo run --release --example canary_sim [RUNS] [LOOKS] [PER_LOOK]
//! (defaults 2000 runs of 60 looks of 250 requests per side: a 10 s
//! interval at 25 requests/s per side for 10 minutes).

use capstan::supervisor::analysis::compare;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    fn binomial(&mut self, n: u32, p: f64) -> f64 {
        (0..n).filter(|_| self.next() < p).count() as f64
    }
}

/// One-sided two-proportion z-test at α = 0.01 (z > 2.326).
fn z_test(ec: f64, eb: f64, n: f64) -> bool {
    let p = (ec + eb) / (2.0 * n);
    let se = (p * (1.0 - p) * 2.0 / n).sqrt();
    se > 0.0 && (ec - eb) / n / se > 2.326
}

/// Per run: the look at which each test first declared the canary worse.
fn simulate(runs: u32, looks: u32, per_look: u32, pc: f64, pb: f64) -> (Vec<u32>, Vec<u32>) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut sprt, mut naive) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (mut ec, mut eb, mut n) = (0.0, 0.0, 0.0);
        let (mut s, mut z) = (None, None);
        for look in 1..=looks {
            ec += rng.binomial(per_look, pc);
            eb += rng.binomial(per_look, pb);
            n += f64::from(per_look);
            if s.is_none() && compare(ec, n, eb, n, 0.01).worse {
                s = Some(look);
            }
            if z.is_none() && z_test(ec, eb, n) {
                z = Some(look);
            }
        }
        sprt.extend(s);
        naive.extend(z);
    }
    (sprt, naive)
}

fn median(v: &mut [u32]) -> u32 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn main() {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a number"))
        .collect();
    let runs = args.first().copied().unwrap_or(2000);
    let looks = args.get(1).copied().unwrap_or(60);
    let per_look = args.get(2).copied().unwrap_or(250);
    println!("{runs} runs of {looks} looks, {per_look} requests per side per look, α = 0.01");
    for base in [0.0, 0.01, 0.05] {
        let (s, z) = simulate(runs, looks, per_look, base, base);
        println!(
            "A/A at {:>4.1}% errors: false alarms mixture SPRT {:.2}%, z-test re-checked every look {:.2}%",
            base * 100.0,
            100.0 * s.len() as f64 / f64::from(runs),
            100.0 * z.len() as f64 / f64::from(runs)
        );
    }
    for (pc, pb) in [(0.01, 0.0), (0.02, 0.01), (0.06, 0.05)] {
        let (mut s, _) = simulate(runs, looks, per_look, pc, pb);
        println!(
            "canary {:.0}% vs baseline {:.0}%: found in {:.1}% of runs, median after {} requests per side",
            pc * 100.0,
            pb * 100.0,
            100.0 * s.len() as f64 / f64::from(runs),
            median(&mut s) * per_look
        );
    }
}
