//! The control ABI's wire format: round trips of every request and reply, the header rules, and
//! decoding of hostile bytes (truncated, oversized counts, random).

mod common;

use common::XorShift;
use kmod::proto::{
    self, encode_error, encode_request, parse_frame, register_list, set_register, status, Command,
    Endpoint, Header, Hello, PinOp, ProtoError, Reg, Reply, Request, StatScope, VmListing,
    HEADER_LEN, MAGIC, MAX_MESSAGE_LEN, VERSION,
};
use passthrough::PciAddress;
use stages::VmRequest;
use vcpu_runner::{Regs, SpecialRegs};

fn every_request() -> Vec<Request> {
    vec![
        Request::Hello,
        Request::GetRegs { vcpu: 3 },
        Request::SetRegs {
            vcpu: 1,
            regs: vec![(Reg::Rip, 0xffff_8000_0000_1000), (Reg::Rax, 7)],
        },
        Request::MemorySegments,
        Request::IoapicPin {
            pin: 23,
            op: PinOp::Pulse,
        },
        Request::IoapicPin {
            pin: 4,
            op: PinOp::Assert,
        },
        Request::IoapicPin {
            pin: 4,
            op: PinOp::Deassert,
        },
        Request::InjectMsi {
            addr: 0xfee0_1000,
            data: 0x4031,
        },
        Request::GetStats { vcpu: Some(0) },
        Request::GetStats { vcpu: None },
        Request::Suspend {
            how: VmRequest::Reset,
        },
        Request::Suspend {
            how: VmRequest::PowerOff,
        },
        Request::Suspend {
            how: VmRequest::Halt,
        },
        Request::Suspend {
            how: VmRequest::TripleFault,
        },
        Request::Reset,
        Request::Bind {
            addr: PciAddress::new(255, 31, 7).unwrap(),
        },
        Request::Unbind {
            addr: PciAddress::new(10, 0, 0).unwrap(),
        },
        Request::Pause,
        Request::Resume,
        Request::Trace { on: true },
        Request::Trace { on: false },
        Request::Create {
            name: "guest-ü".into(),
            ncpus: 4,
        },
        Request::Destroy { name: "g".into() },
        Request::List,
        Request::Sysctl,
    ]
}

#[test]
fn every_request_round_trips_through_a_frame() {
    for (i, req) in every_request().into_iter().enumerate() {
        let id = 1000 + u64::try_from(i).unwrap();
        let bytes = encode_request(id, &req).unwrap();
        let (h, payload) = parse_frame(&bytes).unwrap();
        assert_eq!(h.version, VERSION);
        assert_eq!(h.command, req.command() as u16);
        assert_eq!(h.id, id);
        assert_eq!(h.flags, 0);
        h.check_request(proto::MAX_PAYLOAD).unwrap();
        assert_eq!(Request::decode(h.command, payload).unwrap(), req, "{req:?}");
    }
    // Every command is covered.
    for c in Command::ALL {
        assert!(
            every_request().iter().any(|r| r.command() == *c),
            "{c} has no round trip"
        );
    }
}

fn every_reply() -> Vec<(Command, Reply)> {
    let regs = register_list(&Regs::default(), &SpecialRegs::default());
    vec![
        (
            Command::Hello,
            Reply::Hello(Hello {
                version: VERSION,
                endpoint: Endpoint::Vm,
                name: "vm0".into(),
                ncpus: 2,
                running: true,
                maxcpu: 16,
            }),
        ),
        (
            Command::Hello,
            Reply::Hello(Hello {
                version: VERSION,
                endpoint: Endpoint::Module,
                name: "vmmctl".into(),
                ncpus: 0,
                running: false,
                maxcpu: 1,
            }),
        ),
        (Command::GetRegs, Reply::Regs(regs)),
        (
            Command::MemorySegments,
            Reply::MemorySegments(vec![(0, 1 << 30), (1 << 32, 1 << 30)]),
        ),
        (
            Command::GetStats,
            Reply::Stats(vec![
                StatScope {
                    scope: "vcpu0".into(),
                    counters: vec![("total number of vm exits".into(), u64::MAX)],
                },
                StatScope {
                    scope: "devmodel0".into(),
                    counters: vec![],
                },
            ]),
        ),
        (
            Command::List,
            Reply::List(vec![VmListing {
                name: "a".into(),
                ncpus: 1,
                running: false,
            }]),
        ),
        (
            Command::Sysctl,
            Reply::Sysctl(vec![("hw.vmm.maxcpu".into(), "4".into())]),
        ),
        (Command::Suspend, Reply::Done),
        (Command::Pause, Reply::Done),
    ]
}

#[test]
fn every_reply_round_trips() {
    for (cmd, reply) in every_reply() {
        let payload = reply.encode().unwrap();
        let bytes = proto::encode_reply(cmd as u16, 9, status::OK, &payload);
        let (h, p) = parse_frame(&bytes).unwrap();
        h.check_reply().unwrap();
        assert_eq!(h.flags, proto::FLAG_REPLY);
        assert_eq!(Reply::decode(h.command, p).unwrap(), reply);
    }
}

#[test]
fn the_header_layout_is_pinned() {
    let h = Header {
        version: 0x0102,
        command: 0x0304,
        flags: 0x0506_0708,
        status: 0x090a_0b0c,
        length: 0x0d0e_0f10,
        id: 0x1112_1314_1516_1718,
    };
    let b = h.encode();
    assert_eq!(b.len(), HEADER_LEN);
    assert_eq!(&b[0..4], b"BHVC");
    assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), MAGIC);
    assert_eq!(b[4..6], [0x02, 0x01]);
    assert_eq!(b[6..8], [0x04, 0x03]);
    assert_eq!(b[8..12], [0x08, 0x07, 0x06, 0x05]);
    assert_eq!(b[12..16], [0x0c, 0x0b, 0x0a, 0x09]);
    assert_eq!(b[16..20], [0x10, 0x0f, 0x0e, 0x0d]);
    assert_eq!(b[20..24], [0, 0, 0, 0]);
    assert_eq!(b[24..32], [0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11]);
    assert_eq!(Header::decode(&b).unwrap(), h);
}

#[test]
fn header_checks_name_what_is_wrong() {
    let good = Header::request(Command::Hello as u16, 0, 1);
    let mut b = good.encode();
    b[0] = b'X';
    assert!(matches!(
        Header::decode(&b),
        Err(ProtoError::BadMagic { .. })
    ));
    let mut b = good.encode();
    b[21] = 1;
    assert_eq!(
        Header::decode(&b),
        Err(ProtoError::Reserved { value: 0x100 })
    );

    let v2 = Header { version: 2, ..good };
    let e = v2.check_request(proto::MAX_PAYLOAD).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Protocol version 2 not supported (this end speaks 1)"
    );
    let long = Header {
        length: proto::MAX_PAYLOAD + 1,
        ..good
    };
    assert_eq!(
        long.check_request(proto::MAX_PAYLOAD)
            .unwrap_err()
            .to_string(),
        "Payload of 65537 bytes exceeds the limit of 65536"
    );
    let flagged = Header {
        flags: 0x80,
        ..good
    };
    assert_eq!(
        flagged.check_request(proto::MAX_PAYLOAD),
        Err(ProtoError::UnknownFlags { flags: 0x80 })
    );
    let reply_as_request = Header {
        flags: proto::FLAG_REPLY,
        ..good
    };
    assert!(reply_as_request.check_request(proto::MAX_PAYLOAD).is_err());
    let with_status = Header { status: 5, ..good };
    assert!(with_status.check_request(proto::MAX_PAYLOAD).is_err());
    assert!(good.check_reply().is_err(), "a request is not a reply");
    let huge_reply = Header::reply(1, 0, proto::MAX_REPLY_PAYLOAD + 1, 1);
    assert!(matches!(
        huge_reply.check_reply(),
        Err(ProtoError::TooLong { .. })
    ));
}

#[test]
fn payload_decoding_refuses_short_trailing_and_bad_values() {
    let cmd = Command::GetRegs as u16;
    assert!(matches!(
        Request::decode(cmd, &[1, 0]),
        Err(ProtoError::Short { what: "vCPU", .. })
    ));
    assert_eq!(
        Request::decode(cmd, &[1, 0, 0, 0, 9]),
        Err(ProtoError::Trailing { extra: 1 })
    );
    assert_eq!(
        Request::decode(999, &[]),
        Err(ProtoError::UnknownCommand { command: 999 })
    );
    // A register id nobody knows.
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend_from_slice(&1u32.to_le_bytes());
    p.extend_from_slice(&500u16.to_le_bytes());
    p.extend_from_slice(&0u64.to_le_bytes());
    assert_eq!(
        Request::decode(Command::SetRegs as u16, &p),
        Err(ProtoError::BadValue {
            what: "register id",
            value: 500
        })
    );
    // A count that cannot fit is refused before anything is read or allocated.
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        Request::decode(Command::SetRegs as u16, &p),
        Err(ProtoError::Count {
            count: u32::MAX,
            ..
        })
    ));
    // Bad enumerations.
    let mut p = 3u32.to_le_bytes().to_vec();
    p.extend_from_slice(&7u32.to_le_bytes());
    assert!(matches!(
        Request::decode(Command::IoapicPin as u16, &p),
        Err(ProtoError::BadValue {
            what: "pin operation",
            ..
        })
    ));
    assert!(matches!(
        Request::decode(Command::Suspend as u16, &0u32.to_le_bytes()),
        Err(ProtoError::BadValue {
            what: "suspend reason",
            ..
        })
    ));
    assert!(matches!(
        Request::decode(Command::Bind as u16, &[0, 32, 0, 0]),
        Err(ProtoError::BadValue {
            what: "PCI address",
            ..
        })
    ));
    assert!(matches!(
        Request::decode(Command::Bind as u16, &[0, 1, 0, 1]),
        Err(ProtoError::BadValue {
            what: "PCI address padding",
            ..
        })
    ));
    // Strings must be UTF-8 and fit.
    let mut p = 1u32.to_le_bytes().to_vec();
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&[0xff, 0xfe]);
    assert_eq!(
        Request::decode(Command::Create as u16, &p),
        Err(ProtoError::BadUtf8 { what: "VM name" })
    );
    let mut p = 1u32.to_le_bytes().to_vec();
    p.extend_from_slice(&100u16.to_le_bytes());
    p.extend_from_slice(b"abc");
    assert!(matches!(
        Request::decode(Command::Create as u16, &p),
        Err(ProtoError::Short {
            need: 100,
            have: 3,
            ..
        })
    ));
    // Replies: a running flag must be 0 or 1.
    let mut hello = Reply::Hello(Hello {
        version: 1,
        endpoint: Endpoint::Vm,
        name: "x".into(),
        ncpus: 1,
        running: true,
        maxcpu: 1,
    })
    .encode()
    .unwrap();
    hello[3] = 2;
    assert!(Reply::decode(Command::Hello as u16, &hello).is_err());
    // A suspend reason that is not vm_suspend's cannot be encoded.
    assert!(Request::Suspend {
        how: VmRequest::DebugExit(1)
    }
    .encode()
    .is_err());
}

#[test]
fn registers_carry_bhyvectl_names_and_only_general_ones_are_settable() {
    for r in Reg::ALL {
        assert_eq!(Reg::from_id(r.id()), Some(*r));
        assert_eq!(Reg::from_name(r.name()), Some(*r));
    }
    assert_eq!(Reg::from_name("rip"), Some(Reg::Rip));
    assert_eq!(Reg::from_name("gdtr.base"), Some(Reg::GdtrBase));
    let list = register_list(&Regs::default(), &SpecialRegs::default());
    assert_eq!(list.len(), Reg::ALL.len(), "every register is reported");
    let mut r = Regs::default();
    for reg in Reg::ALL {
        assert_eq!(set_register(&mut r, *reg, 1), reg.settable(), "{reg:?}");
    }
    assert_eq!(r.r15, 1);
    assert_eq!(r.rflags, 1);
    assert!(!Reg::Cr0.settable());
}

#[test]
fn segment_access_rights_use_the_vmx_layout() {
    let code64 = vcpu_runner::Segment {
        type_: 0xb,
        s: true,
        dpl: 0,
        present: true,
        l: true,
        g: true,
        ..Default::default()
    };
    assert_eq!(proto::segment_access(&code64), 0xa09b);
    let unusable = vcpu_runner::Segment {
        unusable: true,
        ..Default::default()
    };
    assert_eq!(proto::segment_access(&unusable), 0x1_0000);
}

#[test]
fn error_messages_are_cut_at_a_character_boundary() {
    let long = "é".repeat(MAX_MESSAGE_LEN);
    let bytes = encode_error(1, 2, status::EINVAL, &long);
    let (h, p) = parse_frame(&bytes).unwrap();
    assert_eq!(h.status, status::EINVAL);
    assert!(p.len() <= MAX_MESSAGE_LEN);
    assert!(std::str::from_utf8(p).is_ok());
    assert_eq!(status::name(status::EPROTONOSUPPORT), "EPROTONOSUPPORT");
    assert_eq!(status::name(12345), "E?");
}

#[test]
fn frames_whose_length_lies_are_refused() {
    let mut bytes = encode_request(1, &Request::GetRegs { vcpu: 0 }).unwrap();
    bytes.push(0);
    assert!(matches!(
        parse_frame(&bytes),
        Err(ProtoError::LengthMismatch { length: 4, have: 5 })
    ));
    assert!(matches!(
        parse_frame(&bytes[..10]),
        Err(ProtoError::Short { what: "header", .. })
    ));
}

/// Random and mutated bytes through every decoder: nothing panics, and whatever decodes
/// re-encodes to the same bytes.
#[test]
fn random_and_mutated_bytes_never_panic_and_what_decodes_round_trips() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let seeds: Vec<Vec<u8>> = every_request()
        .iter()
        .map(|r| r.encode().unwrap())
        .chain(every_reply().iter().map(|(_, r)| r.encode().unwrap()))
        .collect();
    let mut decoded = 0u32;
    for round in 0..60_000u32 {
        let payload = if round % 2 == 0 {
            let n = usize::try_from(rng.below(64)).unwrap();
            rng.bytes(n)
        } else {
            let mut p = seeds[usize::try_from(rng.below(seeds.len() as u64)).unwrap()].clone();
            for _ in 0..=rng.below(4) {
                match rng.below(3) {
                    0 if !p.is_empty() => {
                        let i = usize::try_from(rng.below(p.len() as u64)).unwrap();
                        p[i] = rng.bytes(1)[0];
                    }
                    1 if !p.is_empty() => {
                        let n = usize::try_from(rng.below(p.len() as u64)).unwrap();
                        p.truncate(n);
                    }
                    _ => p.extend(rng.bytes(3)),
                }
            }
            p
        };
        let command = if rng.below(8) == 0 {
            u16::try_from(rng.below(65536)).unwrap()
        } else {
            Command::ALL[usize::try_from(rng.below(Command::ALL.len() as u64)).unwrap()] as u16
        };
        // The encoding is canonical: what decodes re-encodes to the very same bytes.
        if let Ok(req) = Request::decode(command, &payload) {
            decoded += 1;
            assert_eq!(req.encode().unwrap(), payload);
        }
        if let Ok(reply) = Reply::decode(command, &payload) {
            assert_eq!(reply.encode().unwrap(), payload);
        }
        // The same bytes as a whole frame.
        let mut frame = Header::request(command, u32::try_from(payload.len()).unwrap(), 1)
            .encode()
            .to_vec();
        frame.extend_from_slice(&payload);
        if rng.below(4) == 0 {
            let i = usize::try_from(rng.below(HEADER_LEN as u64)).unwrap();
            frame[i] ^= 1 << rng.below(8);
        }
        if let Ok((h, p)) = parse_frame(&frame) {
            let _ = h.check_request(proto::MAX_PAYLOAD);
            let _ = Request::decode(h.command, p);
        }
    }
    assert!(
        decoded > 1000,
        "the mutations exercise the decoders ({decoded})"
    );
}
