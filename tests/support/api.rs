//! A fake of the add-on's private-app-tunnel API: HTTPS on loopback with a certificate from a
//! throwaway CA (which the test hands bpg-tunnel through `BPG_TUNNEL_TEST_API_CA_FILE`). It
//! records every request and answers each with the next scripted [`Reply`], then the default.
//! Like the add-on, it keeps the client ids registered (a 2xx POST adds its `clientId`, a 2xx
//! DELETE removes the id its path names), and its [`FakeApi::gate`] stands for the add-on's
//! network: it lets a connection through to the database only while a registration is held.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::rustls;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Status(u16),
    /// Read the request, never answer, keep the connection open.
    Hang,
    /// Read the request, then reset the connection.
    Reset,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub at: Instant,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<Request>>,
    arrived: Condvar,
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Option<Reply>>,
    registered: Mutex<BTreeSet<String>>,
}

impl State {
    /// What the add-on keeps of a request it answered with `code`.
    fn record(&self, request: &Request, code: u16) {
        if !(200..300).contains(&code) {
            return;
        }
        let mut registered = self.registered.lock().unwrap();
        match request.method.as_str() {
            "POST" => {
                let body: serde_json::Value =
                    serde_json::from_str(&request.body).unwrap_or_default();
                if let Some(id) = body["clientId"].as_str() {
                    registered.insert(id.to_owned());
                }
            }
            "DELETE" => {
                let id = request.path.rsplit('/').next().unwrap_or_default();
                registered.remove(id);
            }
            _ => {}
        }
    }
}

pub struct FakeApi {
    addr: SocketAddr,
    ca_file: PathBuf,
    state: Arc<State>,
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
}

impl FakeApi {
    pub fn start() -> FakeApi {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "bpg-tunnel test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();

        let config = rustls::ServerConfig::builder_with_provider(
            rustls::crypto::ring::default_provider().into(),
        )
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        *state.default.lock().unwrap() = Some(Reply::Status(201));
        let serving = state.clone();
        runtime.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let state = serving.clone();
                tokio::spawn(async move {
                    let socket = socket2::SockRef::from(&tcp).try_clone().unwrap();
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Some(request) = read_request(&mut tls).await else {
                        return;
                    };
                    let reply = state
                        .script
                        .lock()
                        .unwrap()
                        .pop_front()
                        .or(*state.default.lock().unwrap())
                        .unwrap();
                    if let Reply::Status(code) = reply {
                        state.record(&request, code);
                    }
                    state.requests.lock().unwrap().push(request);
                    state.arrived.notify_all();
                    match reply {
                        Reply::Status(code) => {
                            let head = format!(
                                "HTTP/1.1 {code} Fake\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
                            );
                            let _ = tls.write_all(head.as_bytes()).await;
                            let _ = tls.shutdown().await;
                        }
                        Reply::Hang => {
                            let mut sink = [0u8; 1024];
                            while matches!(tls.read(&mut sink).await, Ok(n) if n > 0) {}
                        }
                        Reply::Reset => {
                            let _ = socket.set_linger(Some(Duration::ZERO));
                            drop(tls);
                        }
                    }
                });
            }
        });
        FakeApi {
            addr,
            ca_file,
            state,
            _dir: dir,
            runtime,
        }
    }

    /// The `API_BASE_URL` to hand bpg-tunnel (with a path, as the real one may have).
    pub fn base_url(&self) -> String {
        format!("https://{}/api", self.addr)
    }

    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The next requests get these replies, in order; later ones get the default.
    pub fn script(&self, replies: &[Reply]) {
        self.state.script.lock().unwrap().extend(replies);
    }

    pub fn set_default(&self, reply: Reply) {
        *self.state.default.lock().unwrap() = Some(reply);
    }

    /// The client ids the add-on holds a registration for.
    pub fn registered(&self) -> BTreeSet<String> {
        self.state.registered.lock().unwrap().clone()
    }

    /// A port on loopback that forwards each new connection to `database` while any
    /// registration is held, and closes it at once otherwise (the add-on's network, which
    /// admits registered dynos only).
    pub fn gate(&self, database: SocketAddr) -> SocketAddr {
        let listener = self
            .runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let state = self.state.clone();
        self.runtime.spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                if state.registered.lock().unwrap().is_empty() {
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(database).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        addr
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Waits until `n` requests have arrived; panics with what did arrive after `timeout`.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Request> {
        let deadline = Instant::now() + timeout;
        let mut requests = self.state.requests.lock().unwrap();
        while requests.len() < n {
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "{} of {n} requests within {timeout:?}: {:#?}",
                    requests.len(),
                    *requests
                );
            }
            requests = self
                .state
                .arrived
                .wait_timeout(requests, deadline - now)
                .unwrap()
                .0;
        }
        requests.clone()
    }
}

async fn read_request<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Option<Request> {
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = data[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Request {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        at: Instant::now(),
    })
}
