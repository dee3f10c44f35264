//! What receivers saw: real DMARC aggregate reports (Google zipped; Mail.ru,
//! Microsoft, Amazon SES and a small provider gzipped) and TLS reports
//! (RFC 8460 examples), sent through the `[bounces]` intake to its
//! `dmarc_address` and `tlsrpt_address`; `herald dmarc` answers with the
//! figures the files hold (tests/data/dmarc, from mail-auth's test
//! resources, and mail-auth's own reading of each in the .json beside it).

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::*;
use serde_json::Value;

const DOMAIN: &str = "bounces.example.test";
const TOKEN: &str = "a console token of 16+ characters";

fn data(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/dmarc")
            .join(name),
    )
    .unwrap()
}

fn expected(name: &str) -> Value {
    serde_json::from_slice(&data(name)).unwrap()
}

fn report(intake: SocketAddr, to: &str, msg: &[u8]) -> (u16, String) {
    let mut c = Client::connect(intake);
    c.ehlo();
    let r = c.send_bytes("noreply-dmarc-support@google.com", &[to], msg);
    c.cmd("QUIT");
    r
}

/// Events waiting for the (unreachable) alerts endpoint.
fn backlog(h: &Herald) -> u64 {
    let v: Value =
        serde_json::from_str(h.ok(&["webhooks", "--json"]).lines().next().unwrap_or("{}")).unwrap();
    v["backlog"].as_u64().unwrap_or(0)
}

/// A report of Google's form in which the source where herald's key
/// passed sends 10 messages that fail DKIM and SPF.
const FAILING: &str = "From: noreply-dmarc-support@google.com\r\n\
Subject: Report domain: stalw.art Submitter: google.com Report-ID: crafted-1\r\n\
MIME-Version: 1.0\r\nContent-Type: text/xml\r\n\r\n\
<?xml version=\"1.0\" encoding=\"UTF-8\" ?>\r\n<feedback><report_metadata><org_name>google.com</org_name>\
<email>noreply-dmarc-support@google.com</email><report_id>crafted-1</report_id>\
<date_range><begin>1669593600</begin><end>1669679999</end></date_range></report_metadata>\
<policy_published><domain>stalw.art</domain><adkim>r</adkim><aspf>r</aspf><p>none</p><sp>none</sp><pct>100</pct></policy_published>\
<record><row><source_ip>2a01:4f9:c011:b43c::1</source_ip><count>10</count><policy_evaluated>\
<disposition>none</disposition><dkim>fail</dkim><spf>fail</spf></policy_evaluated></row>\
<identifiers><header_from>stalw.art</header_from></identifiers><auth_results><dkim><domain>stalw.art</domain>\
<selector>velikisrpan22</selector><result>fail</result></dkim><spf><domain>stalw.art</domain><result>fail</result></spf>\
</auth_results></record></feedback>\r\n";

fn dmarc(h: &Herald) -> Value {
    serde_json::from_str(&h.ok(&["dmarc", "--since", "5000d", "--json"])).unwrap()
}

#[test]
fn aggregate_and_tls_reports_from_real_receivers_give_their_figures_per_domain() {
    let sink = Sink::start(Script::default());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bounce.key"),
        "an HMAC key of return-path tokens, 32+\n",
    )
    .unwrap();
    // herald signs stalw.art with the selector Google saw pass.
    dkim_keygen(
        dir.path(),
        "stalw.art",
        "velikisrpan22",
        "ed25519",
        "stalw.pem",
    );
    let intake: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    std::fs::write(dir.path().join("api.tokens"), format!("{TOKEN}\n")).unwrap();
    let h = Herald::start_in(
        dir,
        &format!(
            "[api]\nlisten = \"{api}\"\ntokens_file = \"api.tokens\"\n{}\n[[dkim]]\ndomain = \"stalw.art\"\nselector = \"velikisrpan22\"\nprivate_key = \"stalw.pem\"\n\
             [control]\nsocket = \"{{dir}}/herald.sock\"\nmetrics_listen = \"{metrics}\"\n\
             [[webhooks]]\nname = \"alerts\"\nurl = \"http://127.0.0.1:{}/hook\"\nsecret_file = \"bounce.key\"\nevents = [\"dmarc_failing\"]\n\
             [bounces]\ndomain = \"{DOMAIN}\"\nlisten = [\"{intake}\"]\nsecret_file = \"{{dir}}/bounce.key\"\n",
            upstream(sink.port(), "none", ""),
            free_port()
        ),
    );
    let files = ["100", "101", "102", "103", "104"];
    for f in files {
        let (code, text) = report(
            intake,
            &format!("dmarc@{DOMAIN}"),
            &data(&format!("{f}.eml")),
        );
        assert_eq!(code, 250, "{f}: {text}");
    }
    // What the files hold, as mail-auth reads each.
    let (mut messages, mut passed) = (0, 0);
    for f in files {
        for r in expected(&format!("{f}.json"))["record"].as_array().unwrap() {
            let n = r["row"]["count"].as_u64().unwrap();
            let p = &r["row"]["policy_evaluated"];
            messages += n;
            if p["dkim"] == "Pass" || p["spf"] == "Pass" {
                passed += n;
            }
        }
    }
    assert_eq!((messages, passed), (5, 1));
    assert!(
        wait_until(20, || dmarc(&h)["domains"][0]["messages"] == messages),
        "{}\n{}",
        dmarc(&h),
        h.log()
    );
    let v = dmarc(&h);
    let d = &v["domains"][0];
    assert_eq!(d["domain"], "stalw.art");
    assert_eq!(d["passed"], passed);
    assert_eq!(d["reporters"].as_array().unwrap().len(), 5, "{d}");
    // Google saw herald's key pass from one address: herald's own.
    let own = d["herald_sources"].as_array().unwrap();
    assert_eq!(own.len(), 1, "{d}");
    assert_eq!(own[0]["ip"], "2a01:4f9:c011:b43c::1");
    assert_eq!(
        (own[0]["messages"].as_u64(), own[0]["passed"].as_u64()),
        (Some(1), Some(1))
    );
    // The rest came from other servers and failed.
    let other = d["other_sources"].as_array().unwrap();
    assert_eq!(other[0]["ip"], "50.223.129.194", "{d}");
    assert_eq!(other[0]["messages"], 3);
    assert_eq!(other[0]["passed"], 0);
    assert_eq!(other[1]["ip"], "207.171.188.200");
    let diag = d["diagnosis"].as_str().unwrap();
    assert!(
        diag.starts_with("stalw.art: 20% of 5 messages passed DMARC at 5 receivers")
            && diag
                .contains("3 messages from 50.223.129.194, not a herald node, failed SPF and DKIM")
            && diag.contains("authorize it or stop it"),
        "{diag}"
    );
    // The API says the same.
    let (code, body) = http(
        &api,
        "GET",
        "/api/v1/dmarc?domain=stalw.art&since=5000d",
        Some(TOKEN),
        "",
    );
    assert_eq!(code, 200);
    let a: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(a["domains"][0]["diagnosis"], d["diagnosis"], "{a}");
    let (code, _) = http(&api, "GET", "/api/v1/dmarc?since=soon", Some(TOKEN), "");
    assert_eq!(code, 400);
    // Metrics: per sending domain of herald's and result.
    let m = String::from_utf8(http_get(&metrics, "/metrics").1).unwrap();
    assert!(
        m.contains("herald_dmarc_messages_total{domain=\"stalw.art\",result=\"pass\"} 1")
            && m.contains("herald_dmarc_messages_total{domain=\"stalw.art\",result=\"fail\"} 4"),
        "{m}"
    );
    // The people's form says the same.
    let text = h.ok(&["dmarc", "stalw.art", "--since", "5000d"]);
    assert!(
        text.contains(diag) && text.contains("OTHER") && text.contains("50.223.129.194"),
        "{text}"
    );

    // The same report again is counted once.
    let (code, _) = report(intake, &format!("dmarc@{DOMAIN}"), &data("100.eml"));
    assert_eq!(code, 250);
    assert!(wait_until(20, || {
        h.ok(&["reports", "--json"])
            .matches("received before, counted once")
            .count()
            == 1
    }));
    assert_eq!(dmarc(&h)["domains"][0]["messages"], 5);

    // Something that is no aggregate report: kept as unparsed, counts nothing.
    let junk = b"From: x@y.test\r\nSubject: Report domain: stalw.art\r\n\r\nnot XML at all\r\n";
    assert_eq!(report(intake, &format!("dmarc@{DOMAIN}"), junk).0, 250);
    assert!(wait_until(20, || {
        let out = h.ok(&["reports", "--state", "unparsed", "--json"]);
        out.contains("not a DMARC aggregate report")
    }));
    assert_eq!(dmarc(&h)["domains"][0]["messages"], 5);

    // An attachment that decompresses past max_size: kept unparsed too.
    assert_eq!(
        report(intake, &format!("dmarc@{DOMAIN}"), &data("oversized.eml")).0,
        250
    );
    assert!(
        wait_until(20, || {
            let out = h.ok(&["reports", "--state", "unparsed", "--json"]);
            out.matches("not a DMARC aggregate report").count() == 2
                && out.contains("decompresses past bounces.max_size")
        }),
        "{}",
        h.ok(&["reports", "--json"])
    );
    assert_eq!(dmarc(&h)["domains"][0]["messages"], 5);

    // TLS reports: sessions per policy domain, as the files say.
    for f in ["rpt01", "rpt02"] {
        let (code, text) = report(
            intake,
            &format!("tlsrpt@{DOMAIN}"),
            &data(&format!("{f}.eml")),
        );
        assert_eq!(code, 250, "{f}: {text}");
    }
    let want: Vec<(String, u64, u64)> = ["rpt01", "rpt02"]
        .iter()
        .flat_map(|f| {
            expected(&format!("{f}.json"))["policies"]
                .as_array()
                .unwrap()
                .clone()
        })
        .map(|p| {
            (
                p["policy"]["policy-domain"].as_str().unwrap().to_string(),
                p["summary"]["total-successful-session-count"]
                    .as_u64()
                    .unwrap(),
                p["summary"]["total-failure-session-count"]
                    .as_u64()
                    .unwrap(),
            )
        })
        .collect();
    assert!(wait_until(20, || dmarc(&h)["tls"]
        .as_array()
        .unwrap()
        .len()
        == want.len()));
    let tls = dmarc(&h)["tls"].as_array().unwrap().clone();
    for (domain, ok, failed) in &want {
        let t = tls.iter().find(|t| t["domain"] == domain.as_str()).unwrap();
        assert_eq!(
            (t["successful"].as_u64(), t["failed"].as_u64()),
            (Some(*ok), Some(*failed)),
            "{t}"
        );
    }
    // The console's DMARC page, in a real browser.
    let (ok, text) = python_script("dmarc_console.py", &[&format!("http://{api}"), TOKEN]);
    assert!(ok, "{text}\n{}", h.log());

    let t1 = tls
        .iter()
        .find(|t| t["domain"] == "company-y.example")
        .unwrap();
    assert_eq!(
        t1["failures"]["certificate-expired"], 100,
        "RFC 8460 names: {t1}"
    );

    // A report in which herald's own mail (from the address where its key
    // passed before) fails: a dmarc_failing event, to the webhooks that
    // want it.
    assert_eq!(backlog(&h), 0, "no alert from the real reports");
    let (code, text) = report(intake, &format!("dmarc@{DOMAIN}"), FAILING.as_bytes());
    assert_eq!(code, 250, "{text}");
    assert!(wait_until(20, || backlog(&h) == 1), "{}", h.log());
    let (code, body) = http(
        &api,
        "GET",
        "/api/v1/events?event=dmarc_failing",
        Some(TOKEN),
        "",
    );
    assert_eq!(code, 200);
    let ev: Value = serde_json::from_slice(&body).unwrap();
    let detail = ev["events"][0]["detail"].as_str().unwrap_or("");
    assert!(
        detail.starts_with(
            "stalw.art: herald's own mail passed DMARC for 0.0% of 10 messages at google.com"
        ) && detail.contains("under bounces.dmarc_alert_below = 95%"),
        "{ev}"
    );

    // Only the report addresses and tokens are open at the intake.
    let (code, _) = report(intake, &format!("postmaster@{DOMAIN}"), &data("100.eml"));
    assert_eq!(code, 550);
}
