//! A loader's entry state as the boot vCPU's registers.

use crate::backend::{DescriptorTable, EntryRegs, Segment};

fn seg(s: &loader::Segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        unusable: !s.present,
    }
}

impl From<&loader::EntryState> for EntryRegs {
    fn from(e: &loader::EntryState) -> Self {
        EntryRegs {
            rip: e.rip,
            rsp: e.rsp,
            rsi: e.rsi,
            rbx: e.rbx,
            rax: e.rax,
            rflags: e.rflags,
            cr0: e.cr0,
            cr3: e.cr3.unwrap_or(0),
            cr4: e.cr4,
            efer: e.efer,
            gdt: DescriptorTable {
                base: e.gdt_base,
                limit: e.gdt_limit,
            },
            cs: seg(&e.code_segment),
            ds: seg(&e.data_segment),
            tr: e.tss_segment.present.then(|| seg(&e.tss_segment)),
        }
    }
}
