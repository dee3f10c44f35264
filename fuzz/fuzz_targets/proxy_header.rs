//! The PROXY v1/v2 header reader, driven over the input as a `&[u8]`
//! stream on a current-thread runtime.
#![no_main]

use herald::smtp_in::proxy::{read_header, HeaderError};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
}

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let got = RT.with(|rt| rt.block_on(read_header(&mut r)));
    let used = data.len() - r.len();
    match &got {
        Ok(_) => {
            // The header is read up to its end and never beyond.
            if data.starts_with(b"PROXY ") {
                assert!(used <= 107, "v1 header of {used} bytes");
                assert!(data[..used].ends_with(b"\r\n"));
            } else {
                assert!(data.starts_with(b"\r\n\r\n\0\r\nQUIT\n"));
                let len = u16::from_be_bytes([data[14], data[15]]) as usize;
                assert!(len <= 1024);
                assert_eq!(used, 16 + len);
            }
        }
        Err(HeaderError::Empty) => assert!(data.is_empty()),
        Err(HeaderError::Timeout) => panic!("timeout on an in-memory stream"),
        Err(HeaderError::Io(e)) => panic!("I/O error on an in-memory stream: {e}"),
        Err(_) => {}
    }
    // Never reads more than the longest header it takes.
    assert!(used <= 16 + 1024, "read {used} bytes");
});
