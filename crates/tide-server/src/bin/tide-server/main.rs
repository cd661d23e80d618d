//! The `tide-server` binary: flags, environment and a configuration file
//! in, the library's server out.

mod config;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use tide_core::limits;
use tide_server::{
    Authenticator, BODY_READ_TIMEOUT_DEFAULT, Backend, COLLECT_INTERVAL_DEFAULT, CONNECTIONS_MAX_DEFAULT, Durability,
    HEADER_READ_TIMEOUT_DEFAULT, HELD_PER_NAMESPACE_MAX_DEFAULT, HELD_REQUESTS_MAX_DEFAULT, JWT_LEEWAY_DEFAULT,
    JWT_NAMESPACE_CLAIM_DEFAULT, JWT_PRINCIPAL_CLAIM_DEFAULT, JwtAuthenticator, JwtConfig, NoAuth,
    PRINCIPAL_REQUESTS_PER_SECOND_MAX_DEFAULT, REQUEST_BYTES_IN_FLIGHT_MAX_DEFAULT, RulesFile, SHUTDOWN_GRACE_DEFAULT,
    Server, ServerConfig, SqliteBackend, StaticTokens, TOMBSTONE_HORIZON_SEQS_DEFAULT,
};

/// tide's sync server: clients POST their pending writes and pull what
/// changed, over one endpoint. SQLite is the default storage.
#[derive(Parser, Debug)]
#[command(name = "tide-server", version, about, long_about = None, args_override_self = true)]
struct Args {
    /// A configuration file (TOML): each setting's flag name is its key.
    /// Flags and environment variables win over it.
    #[arg(long, env = config::CONFIG_ENV)]
    config: Option<PathBuf>,
    /// Serve HTTPS with the certificate chain in this PEM file (with
    /// --tls-key); SIGHUP reads both files again.
    #[arg(long, env = "TIDE_SERVER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "TIDE_SERVER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "TIDE_SERVER_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// SQLite database file (created if missing); the default storage.
    #[arg(long, env = "TIDE_SERVER_DB", default_value = "tide-server.db")]
    db: PathBuf,
    /// PostgreSQL instead of SQLite, e.g. `postgres://user@host/db`: several
    /// servers can share one database. `?options[search_path]=SCHEMA` picks a schema.
    #[arg(long, env = "TIDE_SERVER_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Path of the sync endpoint.
    #[arg(long, env = "TIDE_SERVER_PATH", default_value = "/sync")]
    path: String,
    /// Serve everyone in one namespace without authentication (local use only).
    #[arg(long, env = "TIDE_SERVER_NO_AUTH", conflicts_with_all = ["tokens_file", "tokens"])]
    no_auth: bool,
    /// The namespace of --no-auth mode, and of the token generated when no
    /// authentication is configured.
    #[arg(long, env = "TIDE_SERVER_NAMESPACE", default_value = "default")]
    namespace: String,
    /// File of bearer tokens: one `TOKEN NAMESPACE [PRINCIPAL]` per line.
    #[arg(long, env = "TIDE_SERVER_TOKENS_FILE")]
    tokens_file: Option<PathBuf>,
    /// Access rules (TOML): which collections each principal may read and
    /// write. Without it every principal reads and writes its whole namespace.
    #[arg(long, env = "TIDE_SERVER_RULES")]
    rules: Option<PathBuf>,
    /// Bearer tokens as `TOKEN=NAMESPACE,TOKEN=NAMESPACE`.
    #[arg(long, env = "TIDE_SERVER_TOKENS", hide_env_values = true)]
    tokens: Option<String>,
    /// Bearer tokens are JWTs signed with HS256 and this secret.
    #[arg(long, env = "TIDE_SERVER_JWT_SECRET", hide_env_values = true, conflicts_with_all = ["no_auth", "tokens_file", "tokens", "jwks_file"])]
    jwt_secret: Option<String>,
    /// Bearer tokens are JWTs signed by a key of this JWKS file (RS256, ES256 or Ed25519).
    #[arg(long, env = "TIDE_SERVER_JWKS_FILE", conflicts_with_all = ["no_auth", "tokens_file", "tokens", "jwks_url"])]
    jwks_file: Option<PathBuf>,
    /// Bearer tokens are JWTs signed by a key of the JWKS at this URL, fetched
    /// at start and again when a token names a key it lacks.
    #[arg(long, env = "TIDE_SERVER_JWKS_URL", conflicts_with_all = ["no_auth", "tokens_file", "tokens", "jwt_secret"])]
    jwks_url: Option<String>,
    /// The audience a JWT must name in `aud` (not checked if unset).
    #[arg(long, env = "TIDE_SERVER_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// The issuer a JWT must carry in `iss` (not checked if unset).
    #[arg(long, env = "TIDE_SERVER_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Seconds of clock skew allowed on a JWT's `exp` and `nbf`.
    #[arg(long, env = "TIDE_SERVER_JWT_LEEWAY", default_value_t = JWT_LEEWAY_DEFAULT.as_secs())]
    jwt_leeway: u64,
    /// The JWT claim that names the namespace.
    #[arg(long, env = "TIDE_SERVER_JWT_NAMESPACE_CLAIM", default_value = JWT_NAMESPACE_CLAIM_DEFAULT)]
    jwt_namespace_claim: String,
    /// The namespace of a JWT without that claim (without this flag such a token is refused).
    #[arg(long, env = "TIDE_SERVER_JWT_DEFAULT_NAMESPACE")]
    jwt_default_namespace: Option<String>,
    /// The JWT claim that names the principal.
    #[arg(long, env = "TIDE_SERVER_JWT_PRINCIPAL_CLAIM", default_value = JWT_PRINCIPAL_CLAIM_DEFAULT)]
    jwt_principal_claim: String,
    /// Commit durability: `full` (an acknowledged op survives power loss) or
    /// `normal` (the last commits may be lost on power loss: SQLite's
    /// `synchronous=NORMAL`, PostgreSQL's `synchronous_commit=off`).
    #[arg(long, env = "TIDE_SERVER_DURABILITY", default_value = "full", value_parser = ["full", "normal"])]
    durability: String,
    /// Largest request body in bytes (with or without Content-Length).
    #[arg(long, env = "TIDE_SERVER_REQUEST_BYTES_MAX", default_value_t = limits::REQUEST_BYTES_MAX)]
    request_bytes_max: usize,
    /// Most ops in one request (the original client sends up to 500).
    #[arg(long, env = "TIDE_SERVER_OPS_PER_REQUEST_MAX", default_value_t = limits::OPS_PER_REQUEST_MAX)]
    ops_per_request_max: usize,
    /// Largest document in bytes of compact JSON.
    #[arg(long, env = "TIDE_SERVER_DOC_BYTES_MAX", default_value_t = limits::DOC_BYTES_MAX)]
    doc_bytes_max: usize,
    /// Longest document id in bytes.
    #[arg(long, env = "TIDE_SERVER_ID_BYTES_MAX", default_value_t = limits::ID_BYTES_MAX)]
    id_bytes_max: usize,
    /// Longest collection name in bytes.
    #[arg(long, env = "TIDE_SERVER_COLLECTION_BYTES_MAX", default_value_t = limits::COLLECTION_BYTES_MAX)]
    collection_bytes_max: usize,
    /// Most changes in one response.
    #[arg(long, env = "TIDE_SERVER_CHANGES_PER_RESPONSE_MAX", default_value_t = limits::CHANGES_PER_RESPONSE_MAX)]
    changes_per_response_max: usize,
    /// Most bytes of changes in one response.
    #[arg(long, env = "TIDE_SERVER_RESPONSE_BYTES_MAX", default_value_t = limits::RESPONSE_BYTES_MAX)]
    response_bytes_max: usize,
    /// How far an op's counter may run ahead of the highest the namespace has seen.
    #[arg(long, env = "TIDE_SERVER_LAMPORT_LEAD_MAX", default_value_t = limits::LAMPORT_LEAD_MAX)]
    lamport_lead_max: u64,
    /// Seconds a client has to send its request headers (also the keep-alive idle limit).
    #[arg(long, env = "TIDE_SERVER_HEADER_READ_TIMEOUT", default_value_t = HEADER_READ_TIMEOUT_DEFAULT.as_secs_f64())]
    header_read_timeout: f64,
    /// Seconds a client has to send its request body.
    #[arg(long, env = "TIDE_SERVER_BODY_READ_TIMEOUT", default_value_t = BODY_READ_TIMEOUT_DEFAULT.as_secs_f64())]
    body_read_timeout: f64,
    /// Most connections open at once.
    #[arg(long, env = "TIDE_SERVER_CONNECTIONS_MAX", default_value_t = CONNECTIONS_MAX_DEFAULT)]
    connections_max: usize,
    /// Most long-polls held at once (past it, waiting requests are answered at once).
    #[arg(long, env = "TIDE_SERVER_HELD_REQUESTS_MAX", default_value_t = HELD_REQUESTS_MAX_DEFAULT)]
    held_requests_max: usize,
    /// Most long-polls held at once in one namespace.
    #[arg(long, env = "TIDE_SERVER_HELD_PER_NAMESPACE_MAX", default_value_t = HELD_PER_NAMESPACE_MAX_DEFAULT)]
    held_per_namespace_max: usize,
    /// Longest long-poll hold, in seconds (a client's `wait_ms` is capped to it).
    #[arg(long, env = "TIDE_SERVER_WAIT_MAX", default_value_t = limits::WAIT_MAX.as_secs_f64())]
    wait_max: f64,
    /// Most bytes of request bodies held at once across all connections
    /// (past it: 503 with Retry-After, the body unread).
    #[arg(long, env = "TIDE_SERVER_REQUEST_BYTES_IN_FLIGHT_MAX", default_value_t = REQUEST_BYTES_IN_FLIGHT_MAX_DEFAULT)]
    request_bytes_in_flight_max: usize,
    /// Most requests a second from one principal (past it: 429 with
    /// Retry-After); 0 for no limit.
    #[arg(
        long,
        env = "TIDE_SERVER_PRINCIPAL_REQUESTS_PER_SECOND_MAX",
        default_value_t = PRINCIPAL_REQUESTS_PER_SECOND_MAX_DEFAULT
    )]
    principal_requests_per_second_max: u32,
    /// Tombstones more than this many changes behind their namespace's head
    /// are removed; a client away longer starts again from the beginning.
    /// 0 keeps every tombstone.
    #[arg(long, env = "TIDE_SERVER_TOMBSTONE_HORIZON_SEQS", default_value_t = TOMBSTONE_HORIZON_SEQS_DEFAULT)]
    tombstone_horizon_seqs: u64,
    /// Seconds between background collections of tombstones past the horizon.
    #[arg(long, env = "TIDE_SERVER_COLLECT_INTERVAL", default_value_t = COLLECT_INTERVAL_DEFAULT.as_secs_f64())]
    collect_interval: f64,
    /// Collect the tombstones past the horizon now, say what was removed,
    /// and exit without serving (safe beside a running server).
    #[arg(long)]
    collect: bool,
    /// Seconds in-flight exchanges get to finish on shutdown.
    #[arg(long, env = "TIDE_SERVER_SHUTDOWN_GRACE", default_value_t = SHUTDOWN_GRACE_DEFAULT.as_secs_f64())]
    shutdown_grace: f64,
    /// Log filter, as in `RUST_LOG` (`info`, `tide_server=debug`, ...).
    #[arg(long, env = "TIDE_LOG", default_value = "info")]
    log: String,
    /// Export the server's spans (one per exchange, with its id) to this
    /// OpenTelemetry collector, over OTLP/HTTP (e.g.
    /// `http://127.0.0.1:4318/v1/traces`). Needs the `otel` cargo feature.
    #[arg(long, env = "TIDE_SERVER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Log lines as `text` or as `json` (one object a line).
    #[arg(long, env = "TIDE_SERVER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// What to do instead of serving.
#[derive(Subcommand, Debug)]
enum Cmd {
    /// Takes a consistent snapshot of the SQLite database (--db) into
    /// PATH while a server may be serving it; restore by stopping the
    /// server and putting the file in its place (clients then repair,
    /// PROTOCOL.md §12).
    Backup {
        /// Where to write the snapshot (must not exist).
        path: PathBuf,
    },
    /// The configuration.
    Config {
        #[command(subcommand)]
        action: ConfigCmd,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Checks the settings (file, environment, flags) and prints the
    /// effective ones, secrets masked.
    Check {
        /// Print them as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

async fn authenticator(args: &Args) -> Result<Arc<dyn Authenticator>, String> {
    if args.no_auth {
        return Ok(Arc::new(NoAuth::new(args.namespace.clone())));
    }
    let jwt = || JwtConfig {
        audience: args.jwt_audience.clone(),
        issuer: args.jwt_issuer.clone(),
        leeway: Duration::from_secs(args.jwt_leeway),
        namespace_claim: args.jwt_namespace_claim.clone(),
        default_namespace: args.jwt_default_namespace.clone(),
        principal_claim: args.jwt_principal_claim.clone(),
        ..JwtConfig::default()
    };
    if let Some(secret) = &args.jwt_secret {
        return Ok(Arc::new(JwtAuthenticator::hs256(secret.as_bytes(), jwt())));
    }
    if let Some(url) = &args.jwks_url {
        let auth = JwtAuthenticator::from_jwks_url(url, jwt()).await.map_err(|e| e.to_string())?;
        return Ok(Arc::new(auth));
    }
    if let Some(path) = &args.jwks_file {
        let json = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let auth = JwtAuthenticator::from_jwks(&json, jwt()).map_err(|e| format!("{}: {e}", path.display()))?;
        return Ok(Arc::new(auth));
    }
    let tokens = match (&args.tokens_file, &args.tokens) {
        (Some(path), _) => StaticTokens::from_file(path).map_err(|e| e.to_string())?,
        (None, Some(list)) => StaticTokens::parse_list(list).map_err(|e| e.to_string())?,
        (None, None) => {
            // Secure by default, yet running with no set-up: a fresh random
            // token for the one namespace, shown once.
            let token = format!("{}{}", ulid::Ulid::generate(), ulid::Ulid::generate()).to_ascii_lowercase();
            eprintln!(
                "tide-server: no --tokens-file, --tokens or --no-auth given; clients of namespace {:?} \
                 authenticate with:\n  authorization: Bearer {token}",
                args.namespace
            );
            StaticTokens::new([(token, args.namespace.clone())])
        }
    };
    if tokens.is_empty() {
        return Err("the token list is empty".into());
    }
    Ok(Arc::new(tokens))
}

fn seconds(name: &str, secs: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(secs).map_err(|e| format!("--{name} {secs}: {e}"))
}

/// Log lines to stderr (text or JSON, filtered by --log), and spans to an
/// OpenTelemetry collector when --otlp-endpoint is given; the guard flushes
/// the spans when dropped.
fn logging(args: &Args) -> Result<Option<otel::Guard>, String> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| "info".into());
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = if args.log_format == "json" {
        lines.json().boxed()
    } else {
        lines.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).boxed()
    };
    let (spans, guard) = match &args.otlp_endpoint {
        Some(endpoint) => {
            let (layer, guard) = otel::layer(endpoint)?;
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry().with(spans).with(filter).with(lines).init();
    Ok(guard)
}

/// OpenTelemetry export (the `otel` feature).
#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};

    /// Flushes and stops the exporter when dropped.
    pub(crate) struct Guard(opentelemetry_sdk::trace::SdkTracerProvider);

    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.shutdown();
        }
    }

    pub(crate) type Boxed = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

    /// A layer that sends every span to the collector at `endpoint`.
    pub(crate) fn layer(endpoint: &str) -> Result<(Boxed, Guard), String> {
        use tracing_subscriber::Layer as _;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .with_headers(std::collections::HashMap::new())
            .build()
            .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?;
        let resource = opentelemetry_sdk::Resource::builder().with_service_name("tide-server").build();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("tide-server");
        Ok((tracing_opentelemetry::layer().with_tracer(tracer).boxed(), Guard(provider)))
    }
}

/// Without the `otel` feature: --otlp-endpoint is refused.
#[cfg(not(feature = "otel"))]
mod otel {
    pub(crate) struct Guard;
    pub(crate) type Boxed = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

    pub(crate) fn layer(endpoint: &str) -> Result<(Boxed, Guard), String> {
        Err(format!("--otlp-endpoint {endpoint}: this tide-server was built without its `otel` feature"))
    }
}

/// `config check`: the settings must make a server (limits, durations,
/// rules, TLS files); prints the effective ones.
fn check_config(args: &Args, settings: &[(String, String, &'static str)], json: bool) -> ExitCode {
    let mut problems = Vec::new();
    if let Err(e) = limits_and_config(args) {
        problems.push(e);
    }
    if let Some(path) = &args.rules
        && let Err(e) = RulesFile::load(path)
    {
        problems.push(e.to_string());
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key)
        && let Err(e) = tide_server::Tls::from_pem_files(cert, key)
    {
        problems.push(e.to_string());
    }
    if json {
        let map: serde_json::Map<String, serde_json::Value> =
            settings.iter().map(|(k, v, from)| (k.clone(), serde_json::json!({ "value": v, "from": from }))).collect();
        println!("{}", serde_json::json!({ "ok": problems.is_empty(), "problems": problems, "settings": map }));
    } else {
        for (k, v, from) in settings {
            println!("{k} = {v:?}  # {from}");
        }
        for p in &problems {
            eprintln!("tide-server: {p}");
        }
    }
    if problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// The limits and the server configuration the flags make.
fn limits_and_config(args: &Args) -> Result<(limits::Limits, ServerConfig), String> {
    let limits = limits::Limits {
        request_bytes_max: args.request_bytes_max,
        ops_per_request_max: args.ops_per_request_max,
        doc_bytes_max: args.doc_bytes_max,
        id_bytes_max: args.id_bytes_max,
        collection_bytes_max: args.collection_bytes_max,
        changes_per_response_max: args.changes_per_response_max,
        response_bytes_max: args.response_bytes_max,
        lamport_lead_max: args.lamport_lead_max,
        wait_max: seconds("wait-max", args.wait_max)?,
        ..limits::Limits::default()
    };
    let config = ServerConfig {
        limits: limits.clone(),
        path: args.path.clone(),
        header_read_timeout: seconds("header-read-timeout", args.header_read_timeout)?,
        body_read_timeout: seconds("body-read-timeout", args.body_read_timeout)?,
        connections_max: args.connections_max.max(1),
        shutdown_grace: seconds("shutdown-grace", args.shutdown_grace)?,
        held_requests_max: args.held_requests_max,
        held_per_namespace_max: args.held_per_namespace_max,
        request_bytes_in_flight_max: args.request_bytes_in_flight_max,
        principal_requests_per_second_max: args.principal_requests_per_second_max,
        tombstone_horizon_seqs: args.tombstone_horizon_seqs,
        collect_interval: seconds("collect-interval", args.collect_interval)?,
    };
    Ok((limits, config))
}

async fn run(args: Args) -> Result<(), String> {
    if let Some(Cmd::Backup { path }) = &args.command {
        if args.database_url.is_some() {
            return Err("backup copies a SQLite database; back PostgreSQL up with its own tools (pg_dump)".into());
        }
        let bytes = tide_server::backup_sqlite(&args.db, path).await.map_err(|e| format!("backup: {e}"))?;
        println!("tide-server: {} -> {} ({bytes} bytes)", args.db.display(), path.display());
        return Ok(());
    }
    let auth = authenticator(&args).await?;
    let (limits, config) = limits_and_config(&args)?;
    let durability = if args.durability == "normal" { Durability::Normal } else { Durability::Full };
    let rules = match &args.rules {
        Some(path) => Some(Arc::new(RulesFile::load(path).map_err(|e| e.to_string())?)),
        None => None,
    };
    let backend: Arc<dyn Backend> = if let Some(url) = &args.database_url {
        postgres(url, durability, limits, rules).await?
    } else {
        let backend = SqliteBackend::open(&args.db, durability, limits)
            .await
            .map_err(|e| format!("opening {}: {e}", args.db.display()))?;
        if let Some(rules) = rules {
            backend.set_access_rules(rules);
        }
        backend
    };
    if args.collect {
        let server = Server::new(backend, auth, config);
        let done = server.collect().await.map_err(|e| format!("collecting tombstones: {e}"))?;
        println!(
            "tide-server: removed {} tombstones ({} bytes) in {} namespace steps",
            done.tombstones, done.bytes, done.namespaces
        );
        return Ok(());
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tide_server::Tls::from_pem_files(cert, key).map_err(|e| e.to_string())?),
        _ => None,
    };
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.map_err(|e| format!("listening on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let server = Server::new(backend, auth, config);
    let scheme = if tls.is_some() { "https" } else { "http" };
    // The first line on stdout tells scripts and tests where to connect.
    println!("tide-server listening on {scheme}://{addr}{}", args.path);
    tracing::info!(%addr, db = %args.db.display(), no_auth = args.no_auth, tls = tls.is_some(), "serving");
    match tls {
        Some(tls) => {
            reload_on_sighup(tls.clone());
            server.serve_tls(listener, &tls, shutdown_signal()).await.map_err(|e| e.to_string())
        }
        None => server.serve(listener, shutdown_signal()).await.map_err(|e| e.to_string()),
    }
}

/// The PostgreSQL backend at `url`.
#[cfg(feature = "postgres")]
async fn postgres(
    url: &str,
    durability: Durability,
    limits: limits::Limits,
    rules: Option<Arc<RulesFile>>,
) -> Result<Arc<dyn Backend>, String> {
    let backend = tide_server::PostgresBackend::open(url, durability, limits)
        .await
        .map_err(|e| format!("opening PostgreSQL: {e}"))?;
    if let Some(rules) = rules {
        backend.set_access_rules(rules);
    }
    Ok(backend)
}

/// Built without PostgreSQL.
#[cfg(not(feature = "postgres"))]
#[expect(clippy::unused_async, reason = "the same signature as with the feature")]
async fn postgres(
    _: &str,
    _: Durability,
    _: limits::Limits,
    _: Option<Arc<RulesFile>>,
) -> Result<Arc<dyn Backend>, String> {
    Err("this tide-server was built without its `postgres` feature; --database-url needs it".into())
}

/// Reads the certificate and key again on every SIGHUP; open connections
/// keep theirs, a file that does not load leaves the old one in use.
fn reload_on_sighup(tls: tide_server::Tls) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
        while hangups.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => {
                    tracing::info!("TLS certificate reloaded");
                    // Scripts and tests see it on stdout too.
                    println!("tide-server: TLS certificate reloaded");
                }
                Err(e) => tracing::error!(error = %e, "TLS certificate not reloaded; the old one stays"),
            }
        }
    });
    #[cfg(not(unix))]
    drop(tls);
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// Starts the process again with [`tide_server::GLIBC_TUNABLES`] unless
/// `GLIBC_TUNABLES` is set already (glibc reads it only at start). If that
/// fails the server runs on with glibc's defaults.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        use std::os::unix::process::CommandExt as _;
        if let Ok(exe) = std::env::current_exe() {
            let error = std::process::Command::new(exe)
                .args(std::env::args_os().skip(1))
                .env("GLIBC_TUNABLES", tide_server::GLIBC_TUNABLES)
                .exec();
            eprintln!("tide-server: running with glibc's allocator defaults ({error})");
        }
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let command = Args::command();
    let (arguments, from_file) = match config::argv(&command) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("tide-server: {e}");
            return ExitCode::from(2);
        }
    };
    let matches = command.clone().get_matches_from(arguments);
    let args = match Args::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    if let Some(Cmd::Config { action: ConfigCmd::Check { json } }) = &args.command {
        return check_config(&args, &config::effective(&command, &matches, &from_file), *json);
    }
    // Held to the end: exported spans are flushed when it goes.
    let _spans = match logging(&args) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("tide-server: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tide-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tide-server: {e}");
            ExitCode::FAILURE
        }
    }
}
