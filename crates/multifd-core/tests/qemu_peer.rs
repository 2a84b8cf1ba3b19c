//! QEMU's main migration stream and the QEMU peer without a QEMU: the reader and the
//! encoders against the first 259 bytes a real QEMU 10.0.2 sent (pc machine, 16 MiB, multifd
//! with 2 channels; tests/fixtures/qemu10-pc-main-head.bin, recorded by bench/qemu/capture.py),
//! and `QemuReceiver` fed by a scripted source that speaks QEMU's flush/SYNC protocol over
//! two rounds, whose second round overwrites and zeroes pages of the first.

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use multifd_core::ErrorCode;
use multifd_core::qemu_file::QemuFile;
use multifd_core::qemu_peer::{QemuReceiver, RecvOptions, file_name_for};
use multifd_core::qemu_stream::{self, Configuration, RamBlockEntry, StreamReader, Top, kind, ram_flag};
use multifd_core::transport::Address;
use multifd_core::wire::{Compression, Geometry, InitPacket, PacketHeader};

const HEAD: &[u8] = include_bytes!("fixtures/qemu10-pc-main-head.bin");
const P: u64 = 4096;

fn qemu_blocks() -> Vec<RamBlockEntry> {
    [("mem", 0x100_0000), ("/rom@etc/acpi/tables", 0x20000), ("pc.bios", 0x40000), ("pc.rom", 0x20000), ("/rom@etc/table-loader", 0x1000), ("/rom@etc/acpi/rsdp", 0x1000)]
        .into_iter()
        .map(|(name, used_len)| RamBlockEntry { name: name.into(), used_len })
        .collect()
}

#[test]
fn reads_a_real_qemu10_main_stream_head() {
    let mut r = StreamReader::new(HEAD);
    r.header().unwrap();
    let (config, next) = r.configuration().unwrap();
    assert_eq!(config, Configuration { machine: "pc-i440fx-10.0".into(), capabilities: vec![], page_bits: None, uuid: None });
    assert_eq!(r.top_after(next).unwrap(), Top::Start { full: false, id: 1, name: "ram".into(), instance: 0, version: 4 });
    let w = r.ram_word(P).unwrap();
    assert_eq!(w.flags, ram_flag::MEM_SIZE);
    assert_eq!(r.block_list(w.addr, P).unwrap(), qemu_blocks());
    let list_end = r.pos() as usize;
    // Setup: a flush (the first SYNC round), then the end of the part.
    let flags = |r: &mut StreamReader<&[u8]>| (0..).map_while(|_| Some(r.ram_word(P).unwrap().flags)).take_while(|&f| f != ram_flag::EOS).collect::<Vec<_>>();
    assert_eq!(flags(&mut r), [ram_flag::MULTIFD_FLUSH]);
    r.footer(1).unwrap();
    assert_eq!(r.top().unwrap(), Top::Part { end: false, id: 1 });
    assert_eq!(flags(&mut r), [ram_flag::MULTIFD_FLUSH]);
    r.footer(1).unwrap();
    assert_eq!(r.top().unwrap(), Top::Command { cmd: qemu_stream::CMD_SWITCHOVER_START, data: vec![] });
    assert_eq!(r.top().unwrap(), Top::Part { end: true, id: 1 });
    assert_eq!(flags(&mut r), [ram_flag::MULTIFD_FLUSH]);
    r.footer(1).unwrap();
    assert_eq!(r.pos(), HEAD.len() as u64);
    // Cut anywhere: an early end, never a panic.
    for cut in 0..HEAD.len() {
        let mut r = StreamReader::new(&HEAD[..cut]);
        let e = r.header().and_then(|_| r.configuration()).and_then(|(_, n)| r.top_after(n)).and_then(|_| r.ram_word(P)).and_then(|w| r.block_list(w.addr, P)).map(|_| ());
        if cut < list_end {
            assert_eq!(e.unwrap_err().code, ErrorCode::Truncated, "cut {cut}");
        } else {
            assert!(e.is_ok(), "cut {cut}");
        }
    }
}

/// What the sender writes on the main channel up to the first footer is what QEMU writes.
#[test]
fn encodes_the_head_as_qemu10_does() {
    let mut out = Vec::new();
    qemu_stream::encode_header(&mut out);
    Configuration { machine: "pc-i440fx-10.0".into(), capabilities: vec![], page_bits: None, uuid: None }.encode(&mut out);
    qemu_stream::encode_ram_start(&mut out, 1, &qemu_blocks());
    qemu_stream::encode_ram_word(&mut out, ram_flag::MULTIFD_FLUSH);
    qemu_stream::encode_ram_word(&mut out, ram_flag::EOS);
    qemu_stream::encode_footer(&mut out, 1);
    assert_eq!(out, HEAD[..out.len()]);
    let mut end = Vec::new();
    qemu_stream::encode_command(&mut end, qemu_stream::CMD_SWITCHOVER_START, &[]);
    qemu_stream::encode_section_part(&mut end, kind::SECTION_END, 1);
    qemu_stream::encode_ram_word(&mut end, ram_flag::MULTIFD_FLUSH);
    qemu_stream::encode_ram_word(&mut end, ram_flag::EOS);
    qemu_stream::encode_footer(&mut end, 1);
    assert_eq!(end, HEAD[HEAD.len() - end.len()..]);
}

fn page(fill: u8, n: u64) -> Vec<u8> {
    (0..P).map(|i| fill ^ (i as u8) ^ (n as u8)).collect()
}

struct Tmp(PathBuf);

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The device state and VM description: carried through verbatim.
fn device_tail() -> Vec<u8> {
    let mut t = Vec::new();
    qemu_stream::encode_section_start(&mut t, kind::SECTION_FULL, 0, "timer", 0, 2);
    t.extend_from_slice(&[0xab; 24]);
    qemu_stream::encode_footer(&mut t, 0);
    t.push(kind::EOF);
    let json = br#"{"page_size": 4096, "devices": [{"name": "timer"}]}"#;
    t.push(kind::VMDESCRIPTION);
    t.extend_from_slice(&(json.len() as u32).to_be_bytes());
    t.extend_from_slice(json);
    t
}

#[test]
fn receives_two_sync_rounds_in_order_into_a_qemu_file_and_raw_images() {
    let dir = Tmp(std::env::temp_dir().join(format!("multifd-qemupeer-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let to = dir.0.join("vm.qemu");
    let out_dir = dir.0.join("raw");
    let rx = QemuReceiver::bind(&Address::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
    let Address::Tcp { port, .. } = rx.address().clone() else { unreachable!() };
    let opts = RecvOptions { to: Some(to.clone()), out_dir: Some(out_dir.clone()), channels: None, peer_timeout: Duration::from_secs(10) };
    let server = std::thread::spawn(move || rx.run(&opts));

    let g = Geometry::x86();
    let blocks = vec![RamBlockEntry { name: "mem".into(), used_len: 64 * P }, RamBlockEntry { name: "rom".into(), used_len: 4 * P }];
    let mut chans: Vec<TcpStream> = (0..2u8)
        .map(|id| {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.write_all(&InitPacket { uuid: [0; 16], channel_id: id }.encode()).unwrap();
            c
        })
        .collect();
    let mut num = 0u64;
    let mut packet = |c: &mut TcpStream, block: &str, normal: &[(u64, Vec<u8>)], zero: &[u64]| {
        let offs: Vec<u64> = normal.iter().map(|(o, _)| *o).collect();
        let payload: Vec<u8> = normal.iter().flat_map(|(_, d)| d.clone()).collect();
        num += 1;
        c.write_all(&PacketHeader::data(g, Compression::None, num, block.as_bytes(), &offs, zero, payload.len() as u32).encode(g).unwrap()).unwrap();
        c.write_all(&payload).unwrap();
    };
    let sync = |c: &mut TcpStream| c.write_all(&PacketHeader::sync(0).encode(g).unwrap()).unwrap();

    let mut main = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut m = Vec::new();
    qemu_stream::encode_header(&mut m);
    Configuration { machine: "pc-i440fx-10.0".into(), capabilities: vec![], page_bits: None, uuid: None }.encode(&mut m);
    qemu_stream::encode_ram_start(&mut m, 7, &blocks);
    qemu_stream::encode_ram_word(&mut m, ram_flag::MULTIFD_FLUSH);
    qemu_stream::encode_ram_word(&mut m, ram_flag::EOS);
    qemu_stream::encode_footer(&mut m, 7);
    main.write_all(&m).unwrap();

    // Round 1 (after the setup flush): pages 0..8 and a zero page 8 on channel 0, pages 10 and
    // 11 on channel 1, rom page 0 on channel 1; then every channel syncs.
    for c in chans.iter_mut() {
        sync(c);
    }
    let (c0, c1) = chans.split_at_mut(1);
    let (c0, c1) = (&mut c0[0], &mut c1[0]);
    packet(c0, "mem", &(0..8).map(|i| (i * P, page(0xa0, i))).collect::<Vec<_>>(), &[8 * P]);
    packet(c1, "mem", &[(10 * P, page(0xa0, 10)), (11 * P, page(0xa0, 11))], &[]);
    packet(c1, "rom", &[(0, page(0x55, 0))], &[3 * P]);
    sync(c0);
    sync(c1);
    let mut m = Vec::new();
    qemu_stream::encode_section_part(&mut m, kind::SECTION_PART, 7);
    qemu_stream::encode_ram_word(&mut m, ram_flag::MULTIFD_FLUSH);
    qemu_stream::encode_ram_word(&mut m, ram_flag::EOS);
    qemu_stream::encode_footer(&mut m, 7);
    main.write_all(&m).unwrap();

    // Round 2: page 0 again (new data) on the *other* channel, page 10 now zero, and a page
    // on the main channel itself (RAM_SAVE_FLAG_PAGE), as QEMU without multifd sends them.
    packet(c1, "mem", &[(0, page(0xb0, 0))], &[]);
    packet(c0, "mem", &[], &[10 * P]);
    sync(c0);
    sync(c1);
    let mut m = Vec::new();
    qemu_stream::encode_command(&mut m, qemu_stream::CMD_SWITCHOVER_START, &[]);
    qemu_stream::encode_section_part(&mut m, kind::SECTION_END, 7);
    qemu_stream::encode_ram_word(&mut m, (20 * P) | ram_flag::PAGE);
    qemu_stream::put_idstr(&mut m, "mem");
    m.extend_from_slice(&page(0xc0, 20));
    qemu_stream::encode_ram_word(&mut m, ram_flag::MULTIFD_FLUSH);
    qemu_stream::encode_ram_word(&mut m, ram_flag::EOS);
    qemu_stream::encode_footer(&mut m, 7);
    m.extend_from_slice(&device_tail());
    main.write_all(&m).unwrap();
    drop(main);
    drop(chans);

    let s = server.join().unwrap().unwrap();
    assert_eq!(s.flushes, 3);
    assert_eq!((s.main_pages, s.main_zero_pages), (1, 0));
    assert_eq!(s.pages_present, [10, 1]);
    assert_eq!(s.per_channel.iter().map(|c| c.syncs).collect::<Vec<_>>(), [3, 3]);
    assert_eq!(s.device_state_bytes, device_tail().len() as u64);

    let mut want = vec![0u8; (64 * P) as usize];
    for i in 0..8 {
        want[(i * P) as usize..((i + 1) * P) as usize].copy_from_slice(&page(if i == 0 { 0xb0 } else { 0xa0 }, i));
    }
    want[(11 * P) as usize..(12 * P) as usize].copy_from_slice(&page(0xa0, 11));
    want[(20 * P) as usize..(21 * P) as usize].copy_from_slice(&page(0xc0, 20));
    let f = QemuFile::open(&to).unwrap();
    assert!(f.is_complete());
    assert_eq!(f.capabilities(), ["mapped-ram"]);
    assert_eq!(f.block("mem").unwrap().pages_present, 10);
    let mut got = vec![0xeeu8; want.len()];
    f.extract_into("mem", &mut got).unwrap();
    assert!(got == want, "block mem differs");
    assert!(std::fs::read(out_dir.join(file_name_for("mem"))).unwrap() == want, "raw image of mem differs");
    let bytes = std::fs::read(&to).unwrap();
    assert!(bytes.ends_with(&device_tail()), "device state carried byte for byte");
    assert!(std::fs::read_dir(&dir.0).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains("partial")));
}

/// Without `channels`, the count is what connected by the first flush; a channel that comes
/// later carried pages nobody read, so the receive fails rather than write a file without them.
#[test]
fn a_channel_connecting_after_the_first_flush_fails_the_receive() {
    let dir = Tmp(std::env::temp_dir().join(format!("multifd-qemupeer-late-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let to = dir.0.join("vm.qemu");
    let rx = QemuReceiver::bind(&Address::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
    let Address::Tcp { port, .. } = rx.address().clone() else { unreachable!() };
    let progress = rx.progress();
    let opts = RecvOptions { to: Some(to.clone()), out_dir: None, channels: None, peer_timeout: Duration::from_secs(10) };
    let server = std::thread::spawn(move || rx.run(&opts));
    let g = Geometry::x86();
    let blocks = vec![RamBlockEntry { name: "mem".into(), used_len: 16 * P }];
    let mut c0 = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c0.write_all(&InitPacket { uuid: [0; 16], channel_id: 0 }.encode()).unwrap();
    c0.write_all(&PacketHeader::sync(0).encode(g).unwrap()).unwrap();
    let mut main = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut m = Vec::new();
    qemu_stream::encode_header(&mut m);
    Configuration { machine: "pc-i440fx-10.0".into(), capabilities: vec![], page_bits: None, uuid: None }.encode(&mut m);
    qemu_stream::encode_ram_start(&mut m, 1, &blocks);
    qemu_stream::encode_ram_word(&mut m, ram_flag::MULTIFD_FLUSH);
    main.write_all(&m).unwrap();
    // The receiver counts its channels at that flush.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while progress.channels.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the receiver never started its channels");
        std::thread::yield_now();
    }
    let mut c1 = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c1.write_all(&InitPacket { uuid: [0; 16], channel_id: 1 }.encode()).unwrap();
    let mut m = Vec::new();
    qemu_stream::encode_ram_word(&mut m, ram_flag::EOS);
    qemu_stream::encode_footer(&mut m, 1);
    qemu_stream::encode_section_part(&mut m, kind::SECTION_END, 1);
    qemu_stream::encode_ram_word(&mut m, ram_flag::EOS);
    qemu_stream::encode_footer(&mut m, 1);
    m.extend_from_slice(&device_tail());
    main.write_all(&m).unwrap();
    drop((main, c0, c1));
    let e = server.join().unwrap().unwrap_err();
    assert_eq!(e.code, ErrorCode::ChannelCountMismatch, "{e}");
    assert!(!to.exists());
    assert!(std::fs::read_dir(&dir.0).unwrap().next().is_none(), "no partial file left");
}
