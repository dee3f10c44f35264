//! `herald::report::parse`: any bytes in, a `Report` out, never a panic.
#![no_main]

use herald::report::{parse, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        // libfuzzer-sys's hook aborts at any panic. `report::parse` catches
        // a panic of the MIME parser (mail-parser's debug assertions fire on
        // some malformed trees, and cargo fuzz builds with them on): let
        // that one unwind to it. Any other panic, or one that escapes
        // `parse`, still aborts the run as a crash.
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_mail_parser = info
                .location()
                .is_some_and(|l| l.file().contains("/mail-parser-"));
            if !in_mail_parser {
                abort(info)
            }
        }));
    });
    let rep = parse(data);
    // It gives up with `Unparsed`, and only then says why.
    assert_eq!(rep.kind == Kind::Unparsed, rep.problem.is_some(), "{rep:?}");
    match rep.kind {
        Kind::Failed | Kind::Delayed | Kind::Delivered => {
            assert!(!rep.recipients.is_empty(), "{rep:?}")
        }
        Kind::Complaint | Kind::AuthFailure | Kind::NotSpam => {
            assert!(rep.feedback.is_some(), "{rep:?}")
        }
        Kind::AutoReply | Kind::Unparsed => assert!(rep.recipients.is_empty(), "{rep:?}"),
    }
});
