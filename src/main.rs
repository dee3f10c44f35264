//! herald: an SMTP relay for platforms that send notification mail.
//! `main` only parses the command line and hands over to the modules.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use herald::cli::CliError;

/// mimalloc instead of glibc's malloc: a message makes some 400
/// allocations between reception and delivery, and glibc's malloc and free
/// were 15% of herald's instructions (bench/instructions.sh).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use herald::config::Config;

#[derive(Parser)]
#[command(name = "herald", version, about = "SMTP relay for notification mail")]
struct Cli {
    /// Configuration file [default: $HERALD_CONFIG, then /etc/herald/herald.toml]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay daemon
    Serve,
    /// Write the manual pages (roff) made from these commands: herald(8)
    /// to stdout, or herald.8 and one page per subcommand into DIR
    #[command(hide = true)]
    Man { dir: Option<PathBuf> },
    /// Check the configuration; exit 0 when it is valid
    CheckConfig,
    /// Paused?, queue size, counts, route health, uptime
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Queued messages and per-recipient state
    Queue {
        #[arg(long)]
        json: bool,
    },
    /// One message: envelope, headers, attempts, last response, history
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Make deferred recipients due now
    Retry {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Drop queued mail (event `cancelled`)
    Cancel {
        #[arg(required_unless_present_any = ["tag", "route"], conflicts_with_all = ["tag", "route"])]
        id: Option<String>,
        #[arg(long, conflicts_with = "route")]
        tag: Option<String>,
        /// Everything queued for this upstream
        #[arg(long, value_name = "NAME")]
        route: Option<String>,
    },
    /// Stop all outbound delivery, or one route's (accepting goes on); kept across restarts
    Pause {
        /// Only the mail of this upstream
        #[arg(long, value_name = "NAME")]
        route: Option<String>,
    },
    /// Restart outbound delivery (or one route's)
    Resume {
        #[arg(long, value_name = "NAME")]
        route: Option<String>,
    },
    /// Events, oldest first
    History {
        #[arg(long)]
        rcpt: Option<String>,
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        tag: Option<String>,
        /// Only the last DURATION, e.g. 2h
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Everything known about one recipient, newest first, and a diagnosis
    Trace {
        addr: String,
        #[arg(long)]
        json: bool,
    },
    /// The suppression list
    Suppression {
        #[command(subcommand)]
        cmd: SuppressionCmd,
    },
    /// What receivers saw of each sending domain: DMARC pass rates per
    /// receiver and source (herald's own and others), from the DMARC and
    /// TLS reports at the [bounces] intake
    Dmarc {
        /// Only this domain
        domain: Option<String>,
        /// Reports of the last DURATION (default 7d)
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Recent bounce and complaint reports at the [bounces] intake, newest first
    Reports {
        /// pending, applied, ignored, unmatched or unparsed
        #[arg(long)]
        state: Option<String>,
        /// What the report was read as: failed, delayed, complaint, auto-reply, ...
        #[arg(long)]
        kind: Option<String>,
        /// At most this many (default 50)
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Webhook endpoints: backlog, last success, last error
    Webhooks {
        #[command(subcommand)]
        cmd: Option<WebhooksCmd>,
        #[arg(long)]
        json: bool,
    },
    /// Check SPF, the DKIM key record, DMARC and alignment; hints to fix
    CheckDns {
        /// Only this From domain (default: every sending domain of the config)
        domain: Option<String>,
    },
    /// Test a smart host step by step with the configured settings; exit 0 if all pass
    Probe {
        /// The name in [upstreams]
        upstream: String,
        /// Also try RCPT TO this address
        #[arg(long, value_name = "ADDR")]
        to: Option<String>,
        /// Send a real test message to --to (else RSET and QUIT)
        #[arg(long, requires = "to")]
        send: bool,
    },
    /// Make the running herald re-read its config file (as SIGHUP does); exit 1 if refused
    Reload,
    /// Make a DKIM key (PKCS#8 PEM, mode 0600) and print the DNS record to publish
    DkimKeygen {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: String,
        #[arg(long, default_value = "rsa", value_parser = ["rsa", "ed25519"])]
        algorithm: String,
        /// Where to write the private key (must not exist yet)
        #[arg(long, value_name = "KEY.pem")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum WebhooksCmd {
    /// Send a signed test event to one endpoint (its name, or its URL)
    Test { name: String },
}

#[derive(Subcommand)]
enum SuppressionCmd {
    List {
        #[arg(long)]
        json: bool,
    },
    Add {
        addr: String,
        #[arg(long)]
        reason: Option<String>,
        /// For this tenant's mail only (default: for everyone)
        #[arg(long)]
        tenant: Option<String>,
    },
    Remove {
        addr: String,
        /// The tenant's entry (default: the entry for everyone)
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Write the list as CSV to stdout
    Export,
    /// Add the addresses of a CSV file (as written by export)
    Import { file: PathBuf },
}

/// Runs a client subcommand against the daemon's control socket.
fn client(path: &std::path::Path, cmd: Cmd) -> Result<(), CliError> {
    use herald::cli::*;
    use herald::control::Request;
    let sock = socket_path(path)?;
    let ask = |r: Request| request(&sock, &r);
    match cmd {
        Cmd::Status { json } => print_status(&ask(Request::Status)?, json),
        Cmd::Queue { json } => print_queue(&ask(Request::Queue)?, json),
        Cmd::Show { id, json } => print_show(&ask(Request::Show { id })?, json),
        Cmd::Retry { id, all } => {
            let v = ask(Request::Retry { id, all })?;
            println!("{} recipient(s) due now", v["retried"]);
        }
        Cmd::Cancel { id, tag, route } => {
            print_cancelled(&ask(Request::Cancel { id, tag, route })?)
        }
        Cmd::Pause { route: None } => {
            ask(Request::Pause { route: None })?;
            println!("outbound delivery paused (mail is still accepted and queued); herald resume restarts it");
        }
        Cmd::Resume { route: None } => {
            ask(Request::Resume { route: None })?;
            println!("outbound delivery resumed");
        }
        Cmd::Pause { route: Some(r) } => {
            ask(Request::Pause {
                route: Some(r.clone()),
            })?;
            println!("route {r} paused: its mail is held (other routes go on); herald resume --route {r} releases it");
        }
        Cmd::Resume { route: Some(r) } => {
            ask(Request::Resume {
                route: Some(r.clone()),
            })?;
            println!("route {r} resumed");
        }
        Cmd::History {
            rcpt,
            id,
            tag,
            since,
            json,
        } => {
            let since_s = since_secs(since)?;
            print_history(
                &ask(Request::History {
                    rcpt,
                    id,
                    tag,
                    since_s,
                })?,
                json,
            )
        }
        Cmd::Trace { addr, json } => print_trace(&ask(Request::Trace { addr })?, json),
        Cmd::Reload => {
            let v = ask(Request::Reload)?;
            let r: herald::control::reload::Report = serde_json::from_value(v)
                .map_err(|e| CliError::Failed(format!("bad answer from herald: {e}")))?;
            println!("{}", r.line());
        }
        Cmd::Webhooks { cmd: None, json } => print_webhooks(&ask(Request::Webhooks)?, json),
        Cmd::Reports {
            state,
            kind,
            limit,
            json,
        } => print_reports(&ask(Request::Reports { state, kind, limit })?, json),
        Cmd::Dmarc {
            domain,
            since,
            json,
        } => {
            let since_s = since_secs(since)?;
            print_dmarc(&ask(Request::Dmarc { domain, since_s })?, json)
        }
        Cmd::Webhooks {
            cmd: Some(WebhooksCmd::Test { name }),
            ..
        } => {
            let v = ask(Request::WebhookTest { name })?;
            println!("{}", v["result"].as_str().unwrap_or(""));
        }
        Cmd::Suppression { cmd } => suppression(cmd, &ask)?,
        Cmd::Serve
        | Cmd::Man { .. }
        | Cmd::CheckConfig
        | Cmd::CheckDns { .. }
        | Cmd::DkimKeygen { .. }
        | Cmd::Probe { .. } => {
            unreachable!()
        }
    }
    Ok(())
}

/// `--since DURATION` in seconds.
fn since_secs(since: Option<String>) -> Result<Option<u64>, CliError> {
    since
        .map(|s| {
            humantime::parse_duration(&s)
                .map(|d| d.as_secs())
                .map_err(|e| CliError::Failed(format!("--since {s:?}: {e}")))
        })
        .transpose()
}

/// What `herald cancel` did.
fn print_cancelled(v: &serde_json::Value) {
    let cancelled = v["cancelled"].as_array().cloned().unwrap_or_default();
    for c in &cancelled {
        println!(
            "cancelled {} {}",
            c["id"].as_str().unwrap_or(""),
            c["rcpt"].as_str().unwrap_or("")
        );
    }
    for f in v["already_final"].as_array().cloned().unwrap_or_default() {
        println!(
            "already {} {} {} at {}: nothing changed",
            f["event"].as_str().unwrap_or(""),
            f["id"].as_str().unwrap_or(""),
            f["rcpt"].as_str().unwrap_or(""),
            f["time"].as_str().unwrap_or("")
        );
    }
    if let Some(q) = v["quarantine_removed"].as_str() {
        println!("removed quarantined record {q}");
    } else if cancelled.is_empty() {
        println!("nothing was cancelled");
    }
}

/// " for tenant T's mail" (or nothing: for everyone).
fn tenant_note(tenant: &Option<String>) -> String {
    tenant
        .as_ref()
        .map(|t| format!(" for tenant {t}'s mail"))
        .unwrap_or_default()
}

/// `herald suppression ...`.
fn suppression(
    cmd: SuppressionCmd,
    ask: &dyn Fn(herald::control::Request) -> Result<serde_json::Value, CliError>,
) -> Result<(), CliError> {
    use herald::cli::*;
    use herald::control::Request;
    match cmd {
        SuppressionCmd::List { json } => print_suppressions(&ask(Request::SuppressionList)?, json),
        SuppressionCmd::Add {
            addr,
            reason,
            tenant,
        } => {
            let scope = tenant_note(&tenant);
            ask(Request::SuppressionAdd {
                addr: addr.clone(),
                reason,
                tenant,
            })?;
            println!("{addr} suppressed{scope}");
        }
        SuppressionCmd::Remove { addr, tenant } => {
            let scope = tenant_note(&tenant);
            let v = ask(Request::SuppressionRemove {
                addr: addr.clone(),
                tenant,
            })?;
            if v["removed"] == serde_json::Value::Bool(true) {
                println!("{addr}: suppression lifted{scope}");
            } else {
                println!("{addr} was not suppressed{scope}");
            }
        }
        SuppressionCmd::Export => {
            print!("{}", suppressions_csv(&ask(Request::SuppressionList)?)?)
        }
        SuppressionCmd::Import { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| CliError::Failed(format!("{}: {e}", file.display())))?;
            let entries = parse_suppressions_csv(&text)
                .map_err(|e| CliError::Failed(format!("{}: {e}", file.display())))?;
            // In requests well under the socket's line limit.
            let mut imported = 0;
            let mut batch = Vec::new();
            let mut size = 0;
            let mut it = entries.into_iter().peekable();
            while let Some(e) = it.next() {
                size += serde_json::to_vec(&e).map(|v| v.len()).unwrap_or(0) + 1;
                batch.push(e);
                if size > herald::control::MAX_REQUEST_LINE / 4 || it.peek().is_none() {
                    let entries = std::mem::take(&mut batch);
                    size = 0;
                    let v = ask(Request::SuppressionImport { entries })?;
                    imported += v["imported"].as_u64().unwrap_or(0);
                }
            }
            println!("imported {imported} address(es)");
        }
    }
    Ok(())
}

/// Message buffers of megabytes come and go. glibc raises its mmap
/// threshold to 32 MiB after the first large free, so later buffers come
/// from heaps that never shrink (RSS stayed above 1 GB after 20 MiB
/// messages were delivered). A fixed threshold keeps every buffer over
/// 256 KiB in its own mapping, returned to the system when freed.
fn release_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any
    // thread is started.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// herald(8) and a page per subcommand (herald-serve(8), ...), section 8,
/// from the command definitions above: the manual cannot drift from them.
fn man_pages(dir: Option<&std::path::Path>) -> std::io::Result<()> {
    use clap::CommandFactory;
    use std::io::Write;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let Some(dir) = dir else {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).section("8").render(&mut out)?;
        return std::io::stdout().write_all(&out);
    };
    std::fs::create_dir_all(dir)?;
    fn write(cmd: clap::Command, dir: &std::path::Path) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            write(sub, dir)?;
        }
        clap_mangen::Man::new(cmd).section("8").generate_to(dir)?;
        Ok(())
    }
    write(cmd, dir)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = Config::resolve_path(cli.config.as_deref());
    match cli.cmd {
        Cmd::CheckConfig => match Config::load(&path)
            .map_err(|e| e.to_string())
            .and_then(|cfg| check_files(cfg).map_err(|e| format!("{e:#}")))
        {
            Ok(()) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        Cmd::DkimKeygen {
            domain,
            selector,
            algorithm,
            out,
        } => match herald::dkim::keygen(&domain, &selector, &algorithm, &out) {
            Ok(g) => {
                println!("Wrote {} ({algorithm}, mode 0600).", out.display());
                println!("Publish this TXT record:\n");
                println!("{}", g.zone_line());
                println!("\nThen add to the configuration:\n");
                println!("[[dkim]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nprivate_key = \"{}\"", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("herald: {e:#}");
                ExitCode::from(1)
            }
        },
        Cmd::Serve => serve(&path),
        Cmd::Man { dir } => match man_pages(dir.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("herald: man: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::CheckDns { domain } => check_dns(&path, domain.as_deref()),
        Cmd::Probe { upstream, to, send } => probe(&path, &upstream, to.as_deref(), send),
        other => match run_client(&path, other) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("herald: {}", e.message());
                ExitCode::from(e.exit_code())
            }
        },
    }
}

/// What `serve` (and a reload) loads besides the config, so that
/// `check-config` refuses what they would: the `[listen] tls` certificate
/// and key, every DKIM key, the tracking secret, the CA files, the API
/// tokens.
fn check_files(cfg: Config) -> anyhow::Result<()> {
    herald::live::Live::build(cfg).map(|_| ())
}

/// A client subcommand. Rust ignores SIGPIPE, so `herald history | head -1`
/// would panic on the closed pipe; a listing exits quietly instead, like
/// other Unix tools (the daemon keeps ignoring it).
fn run_client(path: &std::path::Path, cmd: Cmd) -> Result<(), CliError> {
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    client(path, cmd)
}

/// Loads the configuration and a runtime for a command that needs both;
/// on failure says why and gives the exit code.
fn prepare(
    path: &std::path::Path,
    runtime: tokio::runtime::Builder,
) -> Result<(Config, tokio::runtime::Runtime), ExitCode> {
    herald::tls::install_provider();
    let cfg = Config::load(path).map_err(|e| {
        eprintln!("herald: {e}");
        ExitCode::from(1)
    })?;
    let mut runtime = runtime;
    let rt = runtime.enable_all().build().map_err(|e| {
        eprintln!("herald: cannot start the runtime: {e}");
        ExitCode::from(1)
    })?;
    Ok((cfg, rt))
}

fn check_dns(path: &std::path::Path, domain: Option<&str>) -> ExitCode {
    let (cfg, rt) = match prepare(path, tokio::runtime::Builder::new_current_thread()) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match rt.block_on(herald::check_dns::run(&cfg, domain)) {
        Ok(results) if herald::check_dns::print(&results) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("herald: {e}");
            ExitCode::from(1)
        }
    }
}

fn probe(path: &std::path::Path, upstream: &str, to: Option<&str>, send: bool) -> ExitCode {
    let (cfg, rt) = match prepare(path, tokio::runtime::Builder::new_current_thread()) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match rt.block_on(herald::delivery::probe::run(&cfg, upstream, to, send)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("herald: {e}");
            ExitCode::from(1)
        }
    }
}

fn serve(path: &std::path::Path) -> ExitCode {
    herald::init_logging();
    release_large_buffers();
    let (cfg, rt) = match prepare(path, tokio::runtime::Builder::new_multi_thread()) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match rt.block_on(herald::server::serve(cfg)) {
        Ok(herald::server::Exit::Stopped) => ExitCode::SUCCESS,
        // At once, without dropping the runtime and the database: the
        // database would flush again on drop and could hang on the disk
        // that failed.
        Ok(herald::server::Exit::Restart) => std::process::exit(herald::server::EXIT_RESTART),
        Ok(herald::server::Exit::Unflushed) => std::process::exit(0),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("herald: {e:#}");
            ExitCode::from(1)
        }
    }
}
