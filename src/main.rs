//! herald: an SMTP relay for platforms that send notification mail.
//! `main` only parses the command line and hands over to the modules.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Check the configuration; exit 0 when it is valid
    CheckConfig,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = Config::resolve_path(cli.config.as_deref());
    match cli.cmd {
        Cmd::CheckConfig => match Config::load(&path) {
            Ok(_) => {
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
        Cmd::Serve => {
            herald::init_logging();
            herald::tls::install_provider();
            let cfg = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("herald: {e}");
                    return ExitCode::from(1);
                }
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("herald: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(herald::server::serve(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("herald: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
