//! `capstan pull` and `capstan build`, and the pulls and builds `capstan up`
//! makes before it starts anything: pulls with progress per layer on a
//! terminal and plain lines otherwise, builds with their output.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;

use anyhow::{Result, bail};

use crate::spec::{DriverKind, Stack};
use crate::supervisor::driver::container::{self, PullStep};

/// The images to pull for `services` (all of the stack's when empty), each
/// with the services that use it. With `all`, images already there are
/// pulled again (`capstan pull`); otherwise only the missing ones, and those
/// of `pull_policy: always`.
fn wanted(stack: &Stack, services: &[String]) -> Result<BTreeMap<String, (Vec<String>, bool)>> {
    for s in services {
        if !stack.services.contains_key(s) {
            bail!("no service {s:?} in the stack");
        }
    }
    let mut out: BTreeMap<String, (Vec<String>, bool)> = BTreeMap::new();
    for (name, svc) in &stack.services {
        if !services.is_empty() && !services.contains(name) {
            continue;
        }
        if svc.driver() != DriverKind::Container || svc.build.is_some() {
            continue;
        }
        let Some(image) = &svc.image else { continue };
        let policy = svc.container.pull_policy.as_deref();
        if matches!(policy, Some("never" | "build")) {
            continue;
        }
        let e = out.entry(image.clone()).or_default();
        e.0.push(name.clone());
        e.1 |= policy == Some("always");
    }
    Ok(out)
}

/// Pulls what the stack needs; `all` pulls even the images already there.
pub async fn pull_images(stack: &Stack, services: &[String], all: bool) -> Result<()> {
    let images = wanted(stack, services)?;
    if images.is_empty() {
        return Ok(());
    }
    let docker = container::connect().await.map_err(anyhow::Error::msg)?;
    let tty = std::io::stdout().is_terminal();
    for (image, (users, always)) in images {
        if !all && !always && docker.inspect_image(&image).await.is_ok() {
            continue;
        }
        let who = users.join(", ");
        let mut view = Progress::new(tty, &who);
        if !tty {
            println!("{who}: pulling {image}");
        }
        let r = container::pull(&docker, &image, |s| view.step(s)).await;
        view.finish();
        match r {
            Ok(()) => println!("{who}: pulled {image}"),
            Err(e) => bail!("{who}: {e}"),
        }
    }
    Ok(())
}

/// Builds the `build:` services (all, or those named) through the engine,
/// and records each image's id in its service (`built`): an unchanged
/// context builds from the cache to the same id, changed code to a new one,
/// which makes a new revision. A terminal shows each service's current
/// step; otherwise every line of the output is printed.
pub async fn build_images(stack: &mut Stack, stack_id: &str, services: &[String]) -> Result<()> {
    for s in services {
        if !stack.services.contains_key(s) {
            bail!("no service {s:?} in the stack");
        }
    }
    let names: Vec<String> = stack
        .services
        .iter()
        .filter(|(n, s)| {
            s.driver() == DriverKind::Container
                && s.build.is_some()
                && (services.is_empty() || services.contains(n))
        })
        .map(|(n, _)| n.clone())
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let docker = container::connect().await.map_err(anyhow::Error::msg)?;
    let tty = std::io::stdout().is_terminal();
    for name in names {
        let Some(svc) = stack.services.get_mut(&name) else {
            continue;
        };
        let Some(b) = svc.build.clone() else { continue };
        let mut tags = vec![format!("{}:latest", container::build_repo(stack_id, &name))];
        tags.extend(svc.image.clone());
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {prefix:.bold} {wide_msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b.set_prefix(name.clone());
            b.enable_steady_tick(std::time::Duration::from_millis(100));
            b
        });
        if bar.is_none() {
            println!("{name}: building from {}", b.context);
        }
        let mut tail: Vec<String> = Vec::new();
        let r = container::build_image(&docker, &b, &tags, |l| match &bar {
            Some(bar) => {
                bar.set_message(l.to_owned());
                tail.push(l.to_owned());
                if tail.len() > 20 {
                    tail.remove(0);
                }
            }
            None => println!("{name}: {l}"),
        })
        .await;
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        match r {
            Ok(id) => {
                let short = id.trim_start_matches("sha256:");
                println!(
                    "{name}: built {} ({})",
                    tags[0],
                    &short[..short.len().min(12)]
                );
                svc.built = Some(id);
            }
            Err(e) => {
                for l in &tail {
                    println!("{name}: {l}");
                }
                bail!("{name}: {e}");
            }
        }
    }
    Ok(())
}

/// How a pull is shown: a bar per layer on a terminal, a line per change of
/// a layer's status otherwise.
struct Progress {
    tty: bool,
    who: String,
    multi: indicatif::MultiProgress,
    bars: BTreeMap<String, indicatif::ProgressBar>,
    said: BTreeMap<String, String>,
    /// Statuses that only repeat with new byte counts.
    quiet: BTreeSet<&'static str>,
}

impl Progress {
    fn new(tty: bool, who: &str) -> Progress {
        Progress {
            tty,
            who: who.to_owned(),
            multi: indicatif::MultiProgress::new(),
            bars: BTreeMap::new(),
            said: BTreeMap::new(),
            quiet: BTreeSet::from(["Downloading", "Extracting", "Waiting"]),
        }
    }

    fn step(&mut self, s: &PullStep) {
        let (Some(id), Some(status)) = (s.id.as_deref(), s.status.as_deref()) else {
            // Lines about the whole image (the digest, "Status: …").
            if let Some(status) = s.status.as_deref()
                && !self.tty
            {
                println!("{}: {status}", self.who);
            }
            return;
        };
        let detail = s.progress_detail.as_ref();
        let (current, total) = (
            detail.and_then(|d| d.current).unwrap_or(0).max(0) as u64,
            detail.and_then(|d| d.total).unwrap_or(0).max(0) as u64,
        );
        if !self.tty {
            if self.said.get(id).map(String::as_str) != Some(status) {
                self.said.insert(id.to_owned(), status.to_owned());
                let size = if total > 0 && !self.quiet.contains(status) {
                    format!(" ({})", indicatif::HumanBytes(total))
                } else if total > 0 {
                    format!(" ({} total)", indicatif::HumanBytes(total))
                } else {
                    String::new()
                };
                println!("{}: {id}: {status}{size}", self.who);
            }
            return;
        }
        let bar = self.bars.entry(id.to_owned()).or_insert_with(|| {
            let b = self.multi.add(indicatif::ProgressBar::new(0));
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:.bold} {msg:<16} {bar:24} {bytes:>10}/{total_bytes:<10}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_prefix(id.to_owned());
            b
        });
        if total > 0 {
            bar.set_length(total);
            bar.set_position(current.min(total));
        }
        bar.set_message(status.to_owned());
        if status == "Pull complete" || status == "Already exists" {
            bar.finish();
        }
    }

    fn finish(&mut self) {
        for b in self.bars.values() {
            if !b.is_finished() {
                b.finish();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_container_services_with_an_image_to_fetch_are_pulled() {
        let text = "services:\n  a: {image: 'img:1'}\n  b: {image: 'img:1', pull_policy: always}\n  c: {image: other, pull_policy: never}\n  d: {image: built, build: .}\n  e: {command: [x]}\n";
        let (stack, _) = crate::spec::parse_text(
            text,
            "capstan.yaml",
            std::path::Path::new("/srv"),
            "app",
            BTreeMap::new(),
            &crate::spec::LoadOptions::default(),
        )
        .unwrap();
        let w = wanted(&stack, &[]).unwrap();
        assert_eq!(
            w.into_iter().collect::<Vec<_>>(),
            vec![(
                "img:1".to_owned(),
                (vec!["a".to_owned(), "b".to_owned()], true)
            )]
        );
        assert!(wanted(&stack, &["c".into()]).unwrap().is_empty());
        assert!(wanted(&stack, &["zz".into()]).is_err());
    }
}
