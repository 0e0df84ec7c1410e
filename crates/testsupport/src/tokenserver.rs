//! A Docker-style token server for the token-auth test registry
//! ([`crate::registry_with_token_auth`]).
//!
//! docker-registry's `auth: token` answers every request without a token with
//! `401 WWW-Authenticate: Bearer realm=...,service=...,scope=...`; a client then fetches a JWT
//! from the realm and retries with it, which is the flow Docker Hub uses for anonymous pulls.
//! This server grants anonymous clients what they ask for (the registry, not the server, is
//! what the tests exercise) and signs RS256 JWTs with `openssl`, carrying the self-signed
//! certificate in `x5c` so the registry can check it against its `rootcertbundle`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;

/// The `service` the registry expects in a token's audience.
pub const SERVICE: &str = "microbox-test-registry";
/// The `issuer` the registry expects.
pub const ISSUER: &str = "microbox-test-token-issuer";

/// A running token server.
#[derive(Debug)]
pub struct TokenServer {
    /// `http://127.0.0.1:PORT/token`
    pub realm: String,
    /// The certificate the registry trusts (PEM).
    pub cert: PathBuf,
    issued: Arc<AtomicUsize>,
}

impl TokenServer {
    /// Makes a key and certificate under `dir` and starts serving on a free port.
    pub fn start(dir: &Path) -> TokenServer {
        crate::require_tool("openssl", "apt-get install openssl");
        let key = dir.join("token-key.pem");
        let cert = dir.join("token-cert.pem");
        crate::run(Command::new("openssl").args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=microbox-test-token-issuer",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]));
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in", cert.to_str().unwrap()])
            .output()
            .expect("openssl x509");
        assert!(der.status.success(), "openssl x509 -outform DER failed");
        let x5c = STANDARD.encode(&der.stdout);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind token server");
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let issued = Arc::new(AtomicUsize::new(0));
        let count = issued.clone();
        std::thread::Builder::new()
            .name("token-server".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let (key, x5c, count) = (key.clone(), x5c.clone(), count.clone());
                    std::thread::spawn(move || {
                        let mut reader = BufReader::new(&conn);
                        let mut line = String::new();
                        if reader.read_line(&mut line).is_err() {
                            return;
                        }
                        // Skip the headers.
                        let mut h = String::new();
                        while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
                            h.clear();
                        }
                        let target = line.split_whitespace().nth(1).unwrap_or("/");
                        let token = mint(&key, &x5c, &scopes(target));
                        count.fetch_add(1, Ordering::SeqCst);
                        let body = serde_json::json!({
                            "token": token,
                            "access_token": token,
                            "expires_in": 300,
                        })
                        .to_string();
                        let _ = write!(
                            &conn,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    });
                }
            })
            .expect("spawn token server");
        TokenServer {
            realm,
            cert,
            issued,
        }
    }

    /// How many tokens have been handed out so far.
    pub fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }
}

/// The `scope=repository:NAME:ACTIONS` parameters of a token request, as the JWT's `access`.
fn scopes(target: &str) -> Vec<serde_json::Value> {
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("scope="))
        .map(percent_decode)
        .flat_map(|s| {
            s.split(' ')
                .filter_map(|one| {
                    let mut parts = one.splitn(3, ':');
                    let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                    Some(serde_json::json!({
                        "type": kind,
                        "name": name,
                        "actions": actions.split(',').collect::<Vec<_>>(),
                    }))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An RS256 JWT granting `access`, valid for five minutes.
fn mint(key: &Path, x5c: &str, access: &[serde_json::Value]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": "anonymous",
        "aud": SERVICE,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("{:x}", rand::random::<u64>()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let out = crate::output_with_stdin(
        Command::new("openssl").args(["dgst", "-sha256", "-sign", key.to_str().unwrap()]),
        signing_input.as_bytes(),
    );
    assert!(out.status.success(), "openssl dgst -sign failed");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_parsed_from_the_query() {
        let s = scopes(
            "/token?service=x&scope=repository%3Aa%2Fb%3Apull%2Cpush&scope=repository:c:pull",
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s[0]["name"], "a/b");
        assert_eq!(s[0]["actions"], serde_json::json!(["pull", "push"]));
        assert_eq!(s[1]["name"], "c");
    }
}
