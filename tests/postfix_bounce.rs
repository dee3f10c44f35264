//! The whole loop with a real Postfix as the smart host: herald relays to
//! Postfix (which says 250), Postfix relays to the recipient's server,
//! which refuses the address; Postfix then mails its delivery status
//! notification to the return path, which routes to herald's `[bounces]`
//! listener. herald must end with the recipient `bounced` (class hard)
//! and suppressed. Postfix runs as a private instance (its own
//! config_directory, queue and data directories in a temporary
//! directory), so it needs root, as Postfix itself does.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const DOMAIN: &str = "bounces.example.test";

/// A private Postfix instance on 127.0.0.1:`port`, relaying everything to
/// [127.0.0.1]:`relay_port` except mail for the bounce domain, which goes
/// to [127.0.0.1]:`bounce_port`. Stopped on drop.
struct Postfix {
    dir: tempfile::TempDir,
    port: u16,
}

fn postfix_bin() -> Option<PathBuf> {
    ["/usr/sbin/postfix", "/usr/bin/postfix"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Postfix {
    fn etc(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    fn run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(postfix_bin().unwrap())
            .arg("-c")
            .arg(self.etc())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn postconf(etc: &Path, args: &[&str]) {
        let st = Command::new("/usr/sbin/postconf")
            .arg("-c")
            .arg(etc)
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "postconf {args:?}");
    }

    fn start(relay_port: u16, bounce_port: u16) -> Postfix {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // Postfix's daemons run as the postfix user: they must reach in.
        std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        for d in ["etc", "spool", "data"] {
            std::fs::create_dir(root.join(d)).unwrap();
        }
        let st = Command::new("chown")
            .arg("postfix")
            .arg(root.join("data"))
            .status()
            .unwrap();
        assert!(st.success());
        let etc = root.join("etc");
        let master = [
            "/usr/share/postfix/master.cf.dist",
            "/etc/postfix/master.cf",
        ]
        .iter()
        .find(|p| Path::new(p).exists())
        .expect("a master.cf to start from");
        std::fs::copy(master, etc.join("master.cf")).unwrap();
        let port = free_port();
        let r = root.display();
        std::fs::write(
            etc.join("main.cf"),
            format!(
                "compatibility_level = 3.6
queue_directory = {r}/spool
data_directory = {r}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = smarthost.test
mydomain = smarthost.test
myorigin = smarthost.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
local_transport = error:5.1.1 local delivery disabled
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [127.0.0.1]:{relay_port}
transport_maps = inline:{{ {DOMAIN}=smtp:[127.0.0.1]:{bounce_port} }}
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
biff = no
append_dot_mydomain = no
smtputf8_enable = no
maillog_file_prefixes = {r}
maillog_file = {r}/postfix.log
"
            ),
        )
        .unwrap();
        Self::postconf(&etc, &["-MX", "smtp/inet"]);
        Self::postconf(
            &etc,
            &[
                "-M",
                &format!("127.0.0.1:{port}/inet=127.0.0.1:{port} inet n - n - - smtpd"),
            ],
        );
        Self::postconf(&etc, &["-F", "*/*/chroot = n"]);
        let pf = Postfix { dir, port };
        let (ok, out) = pf.run(&["start"]);
        assert!(ok, "postfix start: {out}\n{}", pf.log());
        let addr = format!("127.0.0.1:{port}");
        assert!(
            wait_until(20, || std::net::TcpStream::connect(&addr).is_ok()),
            "postfix does not listen:\n{}",
            pf.log()
        );
        pf
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postfix.log")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = self.run(&["stop"]);
    }
}

#[test]
fn a_bounce_from_a_real_postfix_smart_host_ends_bounced_and_suppressed() {
    if postfix_bin().is_none() || unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs Postfix (./test installs it) and root to run a private instance");
        return;
    }
    // The recipients' server, behind Postfix: it does not know ann.
    let dest = Sink::start(Script {
        rcpt_replies: vec![(
            "ann@".into(),
            "550 5.1.1 <ann@dest.test>: Recipient address rejected: User unknown in virtual mailbox table"
                .into(),
        )],
        ..Default::default()
    });
    let intake = free_port();
    let postfix = Postfix::start(dest.port(), intake);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bounce.key"),
        "the key of the return path tokens\n",
    )
    .unwrap();
    let herald = Herald::start_in(
        dir,
        &format!(
            "{}\n[bounces]\ndomain = \"{DOMAIN}\"\nlisten = [\"127.0.0.1:{intake}\"]\nsecret_file = \"{{dir}}/bounce.key\"\n",
            upstream(postfix.port, "none", "")
        ),
    );
    let mut c = herald.client();
    c.ehlo();
    let (code, reply) = c.send(
        "app@customer.test",
        &["ann@dest.test", "bob@dest.test"],
        &message("your file is ready"),
    );
    assert_eq!(code, 250, "{reply}");
    let id = queue_id(&reply);
    // Postfix takes both (its 250 is all herald hears at first) ...
    assert!(
        wait_until(20, || herald.has_event("ann@dest.test", "delivered")
            && herald.has_event("bob@dest.test", "delivered")),
        "{}\n{}",
        herald.log(),
        postfix.log()
    );
    // ... bob reaches his server, ann is refused there, and Postfix's
    // bounce comes back to ann's return path.
    assert_eq!(dest.wait_for(1, 30).len(), 1, "{}", postfix.log());
    assert_eq!(dest.messages()[0].rcpts, vec!["bob@dest.test".to_string()]);
    let mut bounced = None;
    wait_until(60, || {
        bounced = herald
            .events("ann@dest.test")
            .into_iter()
            .find(|e| e["event"] == "bounced");
        bounced.is_some()
    });
    let ev = bounced
        .unwrap_or_else(|| panic!("no bounce came back:\n{}\n{}", herald.log(), postfix.log()));
    assert_eq!(ev["id"], id.as_str());
    assert_eq!(ev["class"], "hard", "{ev}");
    assert!(ev["detail"].as_str().unwrap().contains("5.1.1"), "{ev}");
    let supp = json_lines(&herald.ok(&["suppression", "list", "--json"]));
    assert!(
        supp.iter().any(|e| e["addr"] == "ann@dest.test"),
        "{supp:?}"
    );
    assert!(
        !supp.iter().any(|e| e["addr"] == "bob@dest.test"),
        "{supp:?}"
    );
    assert!(!herald.has_event("bob@dest.test", "bounced"));
    let t = herald.ok(&["trace", "ann@dest.test"]);
    assert!(t.contains("then bounced by the recipient's server"), "{t}");
}
