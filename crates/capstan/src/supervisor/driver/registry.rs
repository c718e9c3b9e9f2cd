//! Image references and registry credentials as the Docker CLI keeps them:
//! `$DOCKER_CONFIG/config.json` (default `~/.docker/config.json`) with
//! `auths` entries (`auth` = base64 of `user:password`, or an
//! `identitytoken`), per-registry `credHelpers` and a default `credsStore`,
//! both run as `docker-credential-<name> get`.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use bollard::auth::DockerCredentials;
use tokio::io::AsyncWriteExt;

/// Docker Hub's key in `config.json` and for credential helpers.
const HUB_KEY: &str = "https://index.docker.io/v1/";

/// Longest a credential helper may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest `config.json` read.
const MAX_CONFIG: u64 = 1 << 20;

/// An image reference split as the engine's pull takes it: the repository
/// (with its registry), and a tag or a digest.
pub fn split_reference(image: &str) -> (String, String) {
    if let Some((repo, digest)) = image.split_once('@') {
        return (repo.to_owned(), digest.to_owned());
    }
    match image.rsplit_once(':') {
        // A colon after the last slash is a tag; before it, a registry port.
        Some((repo, tag)) if !tag.contains('/') => (repo.to_owned(), tag.to_owned()),
        _ => (image.to_owned(), "latest".to_owned()),
    }
}

/// The registry an image comes from: its first component when that names a
/// host (a dot, a port or `localhost`), else Docker Hub (`docker.io`).
pub fn registry_of(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first.to_owned(),
        _ => "docker.io".to_owned(),
    }
}

/// The registry as `config.json` may spell it: bare host, with a scheme,
/// with a path (`https://index.docker.io/v1/`).
fn normalize(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_owned(),
        h => h.to_owned(),
    }
}

/// Where the Docker CLI keeps its config.
fn config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    Some(PathBuf::from(std::env::var_os("HOME")?).join(".docker/config.json"))
}

/// What `config.json` says for one registry.
#[derive(Debug, PartialEq)]
enum Found {
    Creds(DockerCredentials),
    Helper(String),
    Nothing,
}

fn lookup(config: &serde_json::Value, registry: &str) -> Result<Found, String> {
    let want = normalize(registry);
    if let Some(helpers) = config["credHelpers"].as_object() {
        for (k, v) in helpers {
            if normalize(k) == want
                && let Some(h) = v.as_str()
            {
                return Ok(Found::Helper(h.to_owned()));
            }
        }
    }
    if let Some(auths) = config["auths"].as_object() {
        for (k, v) in auths {
            if normalize(k) != want {
                continue;
            }
            let mut creds = DockerCredentials {
                serveraddress: Some(k.clone()),
                ..Default::default()
            };
            if let Some(token) = v["identitytoken"].as_str().filter(|t| !t.is_empty()) {
                creds.identitytoken = Some(token.to_owned());
                return Ok(Found::Creds(creds));
            }
            if let Some(auth) = v["auth"].as_str().filter(|a| !a.is_empty()) {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| format!("auths.{k}.auth is not base64: {e}"))?;
                let text = String::from_utf8(raw)
                    .map_err(|_| format!("auths.{k}.auth is not user:password"))?;
                let (user, pass) = text
                    .split_once(':')
                    .ok_or_else(|| format!("auths.{k}.auth is not user:password"))?;
                creds.username = Some(user.to_owned());
                creds.password = Some(pass.to_owned());
                return Ok(Found::Creds(creds));
            }
            if let (Some(u), Some(p)) = (v["username"].as_str(), v["password"].as_str()) {
                creds.username = Some(u.to_owned());
                creds.password = Some(p.to_owned());
                return Ok(Found::Creds(creds));
            }
        }
    }
    match config["credsStore"].as_str().filter(|s| !s.is_empty()) {
        Some(store) => Ok(Found::Helper(store.to_owned())),
        None => Ok(Found::Nothing),
    }
}

/// Asks `docker-credential-<helper> get` for a registry's credentials.
async fn from_helper(helper: &str, registry: &str) -> Result<Option<DockerCredentials>, String> {
    let program = format!("docker-credential-{helper}");
    let server = if normalize(registry) == "docker.io" {
        HUB_KEY.to_owned()
    } else {
        registry.to_owned()
    };
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("running {program}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes()).await;
    }
    let out = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("{program} gave no answer within {HELPER_TIMEOUT:?}"))?
        .map_err(|e| format!("running {program}: {e}"))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stdout);
        // Helpers answer this way for a registry they hold nothing for.
        if said.contains("credentials not found") {
            return Ok(None);
        }
        return Err(format!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{program} answered something else than JSON: {e}"))?;
    let user = v["Username"].as_str().unwrap_or_default();
    let secret = v["Secret"].as_str().unwrap_or_default().to_owned();
    let mut creds = DockerCredentials {
        serveraddress: Some(server),
        ..Default::default()
    };
    if user == "<token>" {
        creds.identitytoken = Some(secret);
    } else {
        creds.username = Some(user.to_owned());
        creds.password = Some(secret);
    }
    Ok(Some(creds))
}

/// The credentials to pull `image` with, if the Docker CLI's config holds
/// any for its registry; an error says what in the config is wrong.
pub async fn credentials(image: &str) -> Result<Option<DockerCredentials>, String> {
    match config_path() {
        Some(path) => credentials_in(&path, image).await,
        None => Ok(None),
    }
}

/// [`credentials`] from the config file at `path`.
async fn credentials_in(
    path: &std::path::Path,
    image: &str,
) -> Result<Option<DockerCredentials>, String> {
    let text = match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_CONFIG => {
            return Err(format!(
                "{}: larger than {MAX_CONFIG} bytes",
                path.display()
            ));
        }
        Ok(_) => std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
        Err(_) => return Ok(None),
    };
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let registry = registry_of(image);
    match lookup(&config, &registry).map_err(|e| format!("{}: {e}", path.display()))? {
        Found::Creds(c) => Ok(Some(c)),
        Found::Helper(h) => from_helper(&h, &registry).await,
        Found::Nothing => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_config_file_is_read_up_to_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let entry = r#"{"auths": {"127.0.0.1:5000": {"auth": "YWxpY2U6czNjcmV0"}}, "pad": ""#;
        let big = format!("{entry}{}\"}}", " ".repeat(MAX_CONFIG as usize));
        std::fs::write(&path, big).unwrap();
        let e = credentials_in(&path, "127.0.0.1:5000/app")
            .await
            .unwrap_err();
        assert!(e.contains("larger than 1048576 bytes"), "{e}");
        std::fs::write(&path, format!("{entry}\"}}")).unwrap();
        let c = credentials_in(&path, "127.0.0.1:5000/app")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.username.as_deref(), Some("alice"));
        assert_eq!(
            credentials_in(&dir.path().join("none"), "x").await.unwrap(),
            None
        );
    }

    #[test]
    fn references_split_into_repository_and_tag() {
        let s = |i: &str| split_reference(i);
        assert_eq!(s("redis"), ("redis".into(), "latest".into()));
        assert_eq!(s("redis:7"), ("redis".into(), "7".into()));
        assert_eq!(
            s("127.0.0.1:5000/app"),
            ("127.0.0.1:5000/app".into(), "latest".into())
        );
        assert_eq!(
            s("127.0.0.1:5000/app:v2"),
            ("127.0.0.1:5000/app".into(), "v2".into())
        );
        assert_eq!(s("app@sha256:abcd"), ("app".into(), "sha256:abcd".into()));
    }

    #[test]
    fn the_registry_is_the_first_component_when_it_names_a_host() {
        assert_eq!(registry_of("redis"), "docker.io");
        assert_eq!(registry_of("library/redis:7"), "docker.io");
        assert_eq!(registry_of("ghcr.io/a/b"), "ghcr.io");
        assert_eq!(registry_of("localhost/app"), "localhost");
        assert_eq!(registry_of("127.0.0.1:5000/app:v1"), "127.0.0.1:5000");
    }

    #[test]
    fn config_entries_are_found_however_the_registry_is_spelled() {
        let config = serde_json::json!({
            "auths": {
                "https://index.docker.io/v1/": {"auth": "YWxpY2U6czNjcmV0"},
                "http://127.0.0.1:5000": {"identitytoken": "tok"},
                "bad.example": {"auth": "!!"}
            },
            "credHelpers": {"ghcr.io": "gh"},
            "credsStore": "desktop"
        });
        let Found::Creds(hub) = lookup(&config, "docker.io").unwrap() else {
            panic!("hub credentials")
        };
        assert_eq!(hub.username.as_deref(), Some("alice"));
        assert_eq!(hub.password.as_deref(), Some("s3cret"));
        let Found::Creds(local) = lookup(&config, "127.0.0.1:5000").unwrap() else {
            panic!("token")
        };
        assert_eq!(local.identitytoken.as_deref(), Some("tok"));
        assert_eq!(
            lookup(&config, "ghcr.io").unwrap(),
            Found::Helper("gh".into())
        );
        assert_eq!(
            lookup(&config, "quay.io").unwrap(),
            Found::Helper("desktop".into())
        );
        let e = lookup(&config, "bad.example").unwrap_err();
        assert!(e.contains("auths.bad.example.auth"), "{e}");
        assert_eq!(
            lookup(&serde_json::json!({}), "quay.io").unwrap(),
            Found::Nothing
        );
    }
}
