//! The load generator behind `scripts/bench.sh`: a closed loop of HTTP/1.1 keep-alive
//! connections (hyper) against kms-sidecar (Unix socket or loopback TCP) or OpenBao's Transit
//! engine (loopback TCP), with the same payloads and concurrency for both. Prints one `RESULT`
//! line per run: requests per second, latency percentiles, errors, and, given the server's pid,
//! its CPU time per request and peak RSS.
//!
//! Subcommands:
//! - `run`: a fixed-duration run of one operation (seal/open, or Transit encrypt/decrypt).
//! - `soak`: a mixed seal/open run that samples the server's RSS over time.
//! - `tenants`: seals once for each of N tenants (created on first use), then reports RSS.
//! - `cold-start`: starts a command and times it until `/readyz` answers 200 on its socket.
//!
//! Build: `cargo build --release --example loadgen` (binary in target/release/examples/).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
#[command(about = "Load generator for kms-sidecar and OpenBao Transit")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One operation at a fixed concurrency for a fixed time.
    Run(RunArgs),
    /// Mixed seal/open for a long time, sampling the server's RSS.
    Soak(SoakArgs),
    /// Seals once for each of N tenants, then reports the server's RSS.
    Tenants(TenantsArgs),
    /// Starts a command and measures the time until /readyz answers 200.
    ColdStart(ColdStartArgs),
}

#[derive(Args, Clone)]
struct Target {
    /// kms-sidecar's Unix socket.
    #[arg(long, conflicts_with = "tcp")]
    unix: Option<PathBuf>,
    /// host:port on loopback (kms-sidecar's TCP listener, or OpenBao).
    #[arg(long)]
    tcp: Option<String>,
    /// Bearer token (kms-sidecar over TCP).
    #[arg(long)]
    token: Option<String>,
    /// Talk to OpenBao Transit instead: the token (X-Vault-Token).
    #[arg(long)]
    bao_token: Option<String>,
    /// Transit key name.
    #[arg(long, default_value = "bench")]
    bao_key: String,
    /// kms-sidecar tenant.
    #[arg(long, default_value = "bench")]
    tenant: String,
    /// The server's pid, for its CPU time and peak RSS.
    #[arg(long)]
    pid: Option<u32>,
    /// SO_SNDBUF of the generator's Unix-socket connections (0: the kernel's default), as a
    /// client sending large bodies would set it.
    #[arg(long, default_value_t = 0)]
    sndbuf: usize,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum Op {
    Seal,
    Open,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, value_enum)]
    op: Op,
    /// Plaintext bytes per request.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    #[arg(long, default_value_t = 32)]
    conns: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of load before measuring (discarded).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Send raw bytes (application/octet-stream) instead of JSON (kms-sidecar only).
    #[arg(long)]
    octets: bool,
    /// A label printed in the RESULT line.
    #[arg(long, default_value = "run")]
    label: String,
}

#[derive(Args)]
struct SoakArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
    #[arg(long, default_value_t = 8)]
    conns: usize,
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Tenants the requests are spread over.
    #[arg(long, default_value_t = 100)]
    tenants: usize,
    /// Seconds between RSS samples.
    #[arg(long, default_value_t = 10.0)]
    sample: f64,
}

#[derive(Args)]
struct TenantsArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 100_000)]
    count: usize,
    #[arg(long, default_value_t = 16)]
    conns: usize,
}

#[derive(Args)]
struct ColdStartArgs {
    /// The socket the started command listens on.
    #[arg(long)]
    unix: PathBuf,
    /// Runs.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

// ---- the client side of one connection ----

enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn connect(t: &Target) -> Result<SendRequest<Full<Bytes>>, Error> {
    let stream = match (&t.unix, &t.tcp) {
        (Some(p), _) => {
            let s = tokio::net::UnixStream::connect(p).await?;
            if t.sndbuf > 0 {
                socket2::SockRef::from(&s).set_send_buffer_size(t.sndbuf)?;
            }
            Stream::Unix(s)
        }
        (None, Some(a)) => {
            let s = tokio::net::TcpStream::connect(a).await?;
            s.set_nodelay(true)?;
            Stream::Tcp(s)
        }
        (None, None) => return Err("give --unix or --tcp".into()),
    };
    let sender = match stream {
        Stream::Unix(s) => {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
            tokio::spawn(conn);
            sender
        }
        Stream::Tcp(s) => {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
            tokio::spawn(conn);
            sender
        }
    };
    Ok(sender)
}

/// One prepared request, cloned for every send (the body is shared, not copied).
#[derive(Clone)]
struct Prepared {
    path: String,
    content_type: &'static str,
    body: Bytes,
    auth: Option<(&'static str, String)>,
}

impl Prepared {
    fn request(&self) -> Result<Request<Full<Bytes>>, Error> {
        let mut b = Request::post(&self.path)
            .header("host", "localhost")
            .header("content-type", self.content_type);
        if let Some((name, value)) = &self.auth {
            b = b.header(*name, value.as_str());
        }
        Ok(b.body(Full::new(self.body.clone()))?)
    }
}

async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), Error> {
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Sends and reads the whole answer as it streams in, without joining it into one buffer (as a
/// streaming client would); returns the status and the body's length.
async fn send_drain(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, usize), Error> {
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            len += data.len();
        }
    }
    Ok((status, len))
}

fn auth(t: &Target) -> Option<(&'static str, String)> {
    if let Some(tok) = &t.bao_token {
        Some(("x-vault-token", tok.clone()))
    } else {
        t.token
            .as_ref()
            .map(|tok| ("authorization", format!("Bearer {tok}")))
    }
}

fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 31 % 251) as u8).collect()
}

/// The seal (encrypt) request for `tenant` (ignored by OpenBao) and `plaintext`.
fn seal_request(t: &Target, tenant: &str, plaintext: &[u8], octets: bool) -> Prepared {
    let (path, body, content_type) = if t.bao_token.is_some() {
        let body = serde_json::json!({ "plaintext": B64.encode(plaintext) }).to_string();
        (
            format!("/v1/transit/encrypt/{}", t.bao_key),
            Bytes::from(body),
            "application/json",
        )
    } else if octets {
        (
            format!("/v1/tenants/{tenant}/seal"),
            Bytes::copy_from_slice(plaintext),
            "application/octet-stream",
        )
    } else {
        let body = serde_json::json!({ "plaintext": B64.encode(plaintext) }).to_string();
        (
            format!("/v1/tenants/{tenant}/seal"),
            Bytes::from(body),
            "application/json",
        )
    };
    Prepared {
        path,
        content_type,
        body,
        auth: auth(t),
    }
}

/// Seals once and builds the matching open (decrypt) request.
async fn open_request(
    t: &Target,
    tenant: &str,
    plaintext: &[u8],
    octets: bool,
) -> Result<Prepared, Error> {
    let mut sender = connect(t).await?;
    let seal = seal_request(t, tenant, plaintext, octets);
    let (status, body) = send(&mut sender, seal.request()?).await?;
    if status != StatusCode::OK {
        return Err(format!("seal answered {status}: {}", String::from_utf8_lossy(&body)).into());
    }
    let (path, body, content_type) = if t.bao_token.is_some() {
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        let ct = v["data"]["ciphertext"]
            .as_str()
            .ok_or("no data.ciphertext in the Transit answer")?;
        let body = serde_json::json!({ "ciphertext": ct }).to_string();
        (
            format!("/v1/transit/decrypt/{}", t.bao_key),
            Bytes::from(body),
            "application/json",
        )
    } else if octets {
        (
            format!("/v1/tenants/{tenant}/open"),
            body,
            "application/octet-stream",
        )
    } else {
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        let ct = v["ciphertext"]
            .as_str()
            .ok_or("no ciphertext in the answer")?;
        let body = serde_json::json!({ "ciphertext": ct }).to_string();
        (
            format!("/v1/tenants/{tenant}/open"),
            Bytes::from(body),
            "application/json",
        )
    };
    Ok(Prepared {
        path,
        content_type,
        body,
        auth: auth(t),
    })
}

// ---- the server's process figures ----

/// CPU seconds (user + system) of `pid`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // USER_HZ is 100 on Linux for every architecture this runs on.
    Some((utime + stime) / 100.0)
}

/// A `Vm*` line of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---- run ----

struct Outcome {
    latencies_us: Vec<u32>,
    errors: u64,
}

/// Runs `conns` closed loops of `req` until `stop`; latencies are recorded only while `measure`.
async fn closed_loop(
    t: &Target,
    reqs: Vec<Prepared>,
    conns: usize,
    stop: Arc<AtomicBool>,
    measure: Arc<AtomicBool>,
) -> Result<Outcome, Error> {
    let mut tasks = Vec::with_capacity(conns);
    for i in 0..conns {
        let mut sender = connect(t).await?;
        let reqs = reqs.clone();
        let (stop, measure) = (stop.clone(), measure.clone());
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            let mut n = i;
            while !stop.load(Ordering::Relaxed) {
                let prepared = &reqs[n % reqs.len()];
                n += 1;
                let Ok(req) = prepared.request() else {
                    errors += 1;
                    continue;
                };
                let start = Instant::now();
                let ok = match send_drain(&mut sender, req).await {
                    Ok((status, _)) => status == StatusCode::OK,
                    Err(_) => {
                        // A broken connection is replaced; the failure counts as an error.
                        match connect(&t).await {
                            Ok(s) => sender = s,
                            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                        false
                    }
                };
                if measure.load(Ordering::Relaxed) {
                    if ok {
                        lat.push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    } else {
                        errors += 1;
                    }
                }
            }
            Outcome {
                latencies_us: lat,
                errors,
            }
        }));
    }
    let mut all = Outcome {
        latencies_us: Vec::new(),
        errors: 0,
    };
    for task in tasks {
        let o = task.await?;
        all.latencies_us.extend(o.latencies_us);
        all.errors += o.errors;
    }
    all.latencies_us.sort_unstable();
    Ok(all)
}

async fn run(a: RunArgs) -> Result<(), Error> {
    let pt = payload(a.size);
    let req = match a.op {
        Op::Seal => seal_request(&a.target, &a.target.tenant, &pt, a.octets),
        Op::Open => open_request(&a.target, &a.target.tenant, &pt, a.octets).await?,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let measure = Arc::new(AtomicBool::new(false));
    let load = {
        let (t, stop, measure) = (a.target.clone(), stop.clone(), measure.clone());
        let conns = a.conns;
        tokio::spawn(async move { closed_loop(&t, vec![req], conns, stop, measure).await })
    };
    tokio::time::sleep(Duration::from_secs_f64(a.warmup)).await;
    let cpu0 = a.target.pid.and_then(cpu_seconds);
    let start = Instant::now();
    measure.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
    measure.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let cpu1 = a.target.pid.and_then(cpu_seconds);
    stop.store(true, Ordering::Relaxed);
    let out = load.await??;
    let n = out.latencies_us.len() as f64;
    let rps = n / elapsed;
    let cpu_us = match (cpu0, cpu1) {
        (Some(c0), Some(c1)) if n > 0.0 => format!("{:.1}", (c1 - c0) * 1e6 / n),
        _ => "-".into(),
    };
    let rss = a
        .target
        .pid
        .and_then(|p| status_kib(p, "VmHWM"))
        .map_or("-".into(), |k| k.to_string());
    let lat = &out.latencies_us;
    println!(
        "RESULT label={} op={} size={} conns={} octets={} requests={} errors={} rps={:.0} \
         p50_us={} p99_us={} p999_us={} mib_s={:.1} server_cpu_us_per_op={} server_peak_rss_kib={}",
        a.label,
        match a.op {
            Op::Seal => "seal",
            Op::Open => "open",
        },
        a.size,
        a.conns,
        a.octets,
        n,
        out.errors,
        rps,
        percentile(lat, 0.50),
        percentile(lat, 0.99),
        percentile(lat, 0.999),
        rps * a.size as f64 / (1024.0 * 1024.0),
        cpu_us,
        rss,
    );
    Ok(())
}

// ---- soak ----

async fn soak(a: SoakArgs) -> Result<(), Error> {
    let pt = payload(a.size);
    let mut reqs = Vec::with_capacity(2 * a.tenants);
    for i in 0..a.tenants {
        let tenant = format!("soak-{i}");
        reqs.push(seal_request(&a.target, &tenant, &pt, false));
        reqs.push(open_request(&a.target, &tenant, &pt, false).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let measure = Arc::new(AtomicBool::new(true));
    let load = {
        let (t, stop, measure) = (a.target.clone(), stop.clone(), measure.clone());
        let conns = a.conns;
        tokio::spawn(async move { closed_loop(&t, reqs, conns, stop, measure).await })
    };
    let pid = a.target.pid.ok_or("soak needs --pid")?;
    let start = Instant::now();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    loop {
        let t = start.elapsed().as_secs_f64();
        if let Some(rss) = status_kib(pid, "VmRSS") {
            samples.push((t, rss));
            println!("SAMPLE t={t:.0}s rss_kib={rss}");
        }
        if t >= a.duration {
            break;
        }
        tokio::time::sleep(Duration::from_secs_f64(
            a.sample.min(a.duration - t).max(0.1),
        ))
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let out = load.await??;
    let elapsed = start.elapsed().as_secs_f64();
    // "Start" is the first sample after 10 % of the run (caches and allocator warm).
    let at = |frac: f64| {
        samples
            .iter()
            .find(|(t, _)| *t >= a.duration * frac)
            .or(samples.last())
            .map_or(0, |s| s.1)
    };
    let (s, m, e) = (at(0.1), at(0.5), samples.last().map_or(0, |s| s.1));
    let lat = &out.latencies_us;
    println!(
        "RESULT label=soak requests={} errors={} rps={:.0} p50_us={} p99_us={} p999_us={} \
         rss_start_kib={s} rss_middle_kib={m} rss_end_kib={e} end_over_middle={:.3}",
        lat.len(),
        out.errors,
        lat.len() as f64 / elapsed,
        percentile(lat, 0.50),
        percentile(lat, 0.99),
        percentile(lat, 0.999),
        e as f64 / m.max(1) as f64,
    );
    Ok(())
}

// ---- tenants ----

async fn tenants(a: TenantsArgs) -> Result<(), Error> {
    let pid = a.target.pid.ok_or("tenants needs --pid")?;
    let rss0 = status_kib(pid, "VmRSS").unwrap_or(0);
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.conns {
        let mut sender = connect(&a.target).await?;
        let (t, next, errors, count) = (
            a.target.clone(),
            next.clone(),
            errors.clone(),
            a.count as u64,
        );
        tasks.push(tokio::spawn(async move {
            let pt = payload(64);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let ok = match seal_request(&t, &format!("t-{i}"), &pt, false).request() {
                    Ok(req) => matches!(send(&mut sender, req).await, Ok((StatusCode::OK, _))),
                    Err(_) => false,
                };
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let rss = status_kib(pid, "VmRSS").unwrap_or(0);
    println!(
        "RESULT label=tenants count={} errors={} seconds={secs:.1} rss_before_kib={rss0} \
         rss_after_kib={rss} rss_peak_kib={}",
        a.count,
        errors.load(Ordering::Relaxed),
        status_kib(pid, "VmHWM").unwrap_or(0),
    );
    Ok(())
}

// ---- cold start ----

async fn ready(socket: &std::path::Path) -> bool {
    let t = Target {
        unix: Some(socket.to_owned()),
        tcp: None,
        token: None,
        bao_token: None,
        bao_key: String::new(),
        tenant: String::new(),
        pid: None,
        sndbuf: 0,
    };
    let Ok(mut sender) = connect(&t).await else {
        return false;
    };
    let Ok(req) = Request::get("/readyz")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
    else {
        return false;
    };
    matches!(send(&mut sender, req).await, Ok((StatusCode::OK, _)))
}

async fn cold_start(a: ColdStartArgs) -> Result<(), Error> {
    let (prog, args) = a.command.split_first().ok_or("no command")?;
    let mut times = Vec::new();
    for _ in 0..a.runs {
        let _ = std::fs::remove_file(&a.unix);
        let start = Instant::now();
        let mut child = std::process::Command::new(prog)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let deadline = start + Duration::from_secs(10);
        let mut up = false;
        while Instant::now() < deadline {
            if ready(&a.unix).await {
                up = true;
                break;
            }
            if let Some(status) = child.try_wait()? {
                return Err(format!("the command exited early: {status}").into());
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let ms = start.elapsed().as_secs_f64() * 1e3;
        child.kill()?;
        child.wait()?;
        if !up {
            return Err("not ready within 10 s".into());
        }
        times.push(ms);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "RESULT label=cold_start runs={} min_ms={:.1} median_ms={:.1} max_ms={:.1}",
        times.len(),
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    );
    Ok(())
}

fn main() -> Result<(), Error> {
    let cli = Cli::parse();
    // One worker thread by default: the generator must leave the other core to the server.
    let threads = std::env::var("LOADGEN_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::Run(a) => run(a).await,
            Cmd::Soak(a) => soak(a).await,
            Cmd::Tenants(a) => tenants(a).await,
            Cmd::ColdStart(a) => cold_start(a).await,
        }
    })
}
