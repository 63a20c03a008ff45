//! The one bus: port I/O and MMIO ranges, each owned by exactly one device, each device registered as
//! a fast stage (run inline on the vCPU thread) or a slow stage (run on the device-model side, reached
//! over the per-CPU exit ring).
//!
//! Ranges are validated when a device is registered (zero length, overflow, overlap), so lookup never
//! checks anything but the sorted table. A device sees offsets relative to its own base, never absolute
//! addresses.

use core::fmt;

/// Which address space an access is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Space {
    /// x86 port I/O (0..=0xffff).
    Pio,
    /// Guest-physical memory-mapped I/O.
    Mmio,
}

impl fmt::Display for Space {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Space::Pio => f.write_str("port"),
            Space::Mmio => f.write_str("MMIO"),
        }
    }
}

/// Where a device's handler runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Inline on the vCPU thread (the "in-kernel" devices).
    Fast,
    /// On the device-model side; writes are posted, reads wait for a completion.
    Slow,
    /// On the device-model side, and writes wait for their completion too: for registers whose
    /// effect must be visible before the vCPU's next access reaches the device by another path
    /// (a virtio queue enable before a notify absorbed by an ioeventfd).
    SlowOrdered,
}

/// Index of a device in the registry; what an [`pipeline::ExitRecord`]'s `device` field carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u16);

/// One registered range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusRange {
    /// First address of the range.
    pub base: u64,
    /// Length in bytes (never zero).
    pub len: u64,
    /// Owning device.
    pub device: DeviceId,
    /// The owner's stage.
    pub stage: Stage,
}

impl BusRange {
    /// The last address inside the range.
    fn last(&self) -> u64 {
        // Cannot overflow: checked when the range was inserted.
        self.base + (self.len - 1)
    }
}

/// Why a range could not be registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusError {
    /// The range has length zero.
    ZeroLength { space: Space, base: u64 },
    /// `base + len` overflows the address space (for ports: goes past 0xffff).
    Overflow { space: Space, base: u64, len: u64 },
    /// The range overlaps one already registered.
    Overlap {
        space: Space,
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
    /// More devices than a `u16` id can name, or more ranges than the table holds.
    Full,
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BusError::ZeroLength { space, base } => {
                write!(f, "{space} range at {base:#x} has zero length")
            }
            BusError::Overflow { space, base, len } => {
                write!(
                    f,
                    "{space} range {base:#x}+{len:#x} runs past the end of the address space"
                )
            }
            BusError::Overlap {
                space,
                base,
                len,
                other_base,
                other_len,
            } => write!(
                f,
                "{space} range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}"
            ),
            BusError::Full => f.write_str("bus table is full"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for BusError {}

/// Maximum ranges per address space (fixed so the table needs no allocation).
pub const MAX_RANGES: usize = 64;

/// The sorted range table of one address space.
#[derive(Clone, Debug, Default)]
pub struct RangeTable {
    ranges: heapless::Vec<BusRange, MAX_RANGES>,
}

impl RangeTable {
    /// Registers `range`, keeping the table sorted; refuses zero length, overflow and overlap.
    pub fn insert(&mut self, space: Space, range: BusRange) -> Result<(), BusError> {
        if range.len == 0 {
            return Err(BusError::ZeroLength {
                space,
                base: range.base,
            });
        }
        let limit = match space {
            Space::Pio => 0x1_0000u64,
            Space::Mmio => u64::MAX,
        };
        let end = range
            .base
            .checked_add(range.len - 1)
            .ok_or(BusError::Overflow {
                space,
                base: range.base,
                len: range.len,
            })?;
        if space == Space::Pio && end >= limit {
            return Err(BusError::Overflow {
                space,
                base: range.base,
                len: range.len,
            });
        }
        let pos = self.ranges.partition_point(|r| r.base < range.base);
        let neighbours = [pos.checked_sub(1), Some(pos)];
        for other in neighbours
            .into_iter()
            .flatten()
            .filter_map(|i| self.ranges.get(i))
        {
            if range.base <= other.last() && other.base <= end {
                return Err(BusError::Overlap {
                    space,
                    base: range.base,
                    len: range.len,
                    other_base: other.base,
                    other_len: other.len,
                });
            }
        }
        self.ranges.insert(pos, range).map_err(|_| BusError::Full)
    }

    /// Finds the range holding `addr`; returns it and the offset of `addr` inside it.
    #[inline]
    pub fn lookup(&self, addr: u64) -> Option<(&BusRange, u64)> {
        let pos = self.ranges.partition_point(|r| r.base <= addr);
        let r = self.ranges.get(pos.checked_sub(1)?)?;
        let offset = addr - r.base;
        (offset < r.len).then_some((r, offset))
    }

    /// All ranges, sorted by base.
    pub fn iter(&self) -> impl Iterator<Item = &BusRange> {
        self.ranges.iter()
    }
}

/// The classification of one access: which device owns it, at what offset, in which stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Owning device.
    pub device: DeviceId,
    /// Offset of the access inside the device's range.
    pub offset: u64,
    /// Where the handler runs.
    pub stage: Stage,
}

/// Port and MMIO tables together: the classifier of every I/O exit.
#[derive(Clone, Debug, Default)]
pub struct Bus {
    pio: RangeTable,
    mmio: RangeTable,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `len` bytes at `base` in `space` for `device`.
    pub fn insert(
        &mut self,
        space: Space,
        base: u64,
        len: u64,
        device: DeviceId,
        stage: Stage,
    ) -> Result<(), BusError> {
        let range = BusRange {
            base,
            len,
            device,
            stage,
        };
        match space {
            Space::Pio => self.pio.insert(space, range),
            Space::Mmio => self.mmio.insert(space, range),
        }
    }

    /// Classifies an access; `None` means nobody claims it.
    #[inline]
    pub fn route(&self, space: Space, addr: u64) -> Option<Route> {
        let table = match space {
            Space::Pio => &self.pio,
            Space::Mmio => &self.mmio,
        };
        table.lookup(addr).map(|(r, offset)| Route {
            device: r.device,
            offset,
            stage: r.stage,
        })
    }

    /// The table of one space.
    pub fn table(&self, space: Space) -> &RangeTable {
        match space {
            Space::Pio => &self.pio,
            Space::Mmio => &self.mmio,
        }
    }
}

/// Fills `data` with all-ones: what an unclaimed read returns, whatever its width.
#[inline]
pub fn fill_unclaimed(data: &mut [u8]) {
    data.fill(0xff);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus() -> Bus {
        let mut b = Bus::new();
        b.insert(Space::Pio, 0x3f8, 8, DeviceId(0), Stage::Slow)
            .unwrap();
        b.insert(Space::Pio, 0x40, 4, DeviceId(1), Stage::Fast)
            .unwrap();
        b.insert(Space::Mmio, 0xfec0_0000, 0x1000, DeviceId(2), Stage::Fast)
            .unwrap();
        b
    }

    #[test]
    fn routes_give_offsets_not_addresses() {
        let b = bus();
        let r = b.route(Space::Pio, 0x3fd).unwrap();
        assert_eq!((r.device, r.offset, r.stage), (DeviceId(0), 5, Stage::Slow));
        let r = b.route(Space::Mmio, 0xfec0_0010).unwrap();
        assert_eq!((r.device, r.offset), (DeviceId(2), 0x10));
        assert_eq!(b.route(Space::Pio, 0x3f7), None);
        assert_eq!(b.route(Space::Pio, 0x400), None);
        assert_eq!(b.route(Space::Pio, 0x43).unwrap().offset, 3);
        assert_eq!(b.route(Space::Pio, 0x44), None);
        assert_eq!(b.route(Space::Mmio, 0x3f8), None, "spaces are separate");
        assert_eq!(b.route(Space::Mmio, u64::MAX), None);
    }

    #[test]
    fn bad_ranges_are_refused_with_reason() {
        let mut b = bus();
        assert!(matches!(
            b.insert(Space::Pio, 0x10, 0, DeviceId(9), Stage::Fast),
            Err(BusError::ZeroLength { .. })
        ));
        assert!(matches!(
            b.insert(Space::Pio, 0xfffe, 4, DeviceId(9), Stage::Fast),
            Err(BusError::Overflow { .. })
        ));
        assert!(matches!(
            b.insert(Space::Mmio, u64::MAX - 2, 8, DeviceId(9), Stage::Fast),
            Err(BusError::Overflow { .. })
        ));
        let e = b
            .insert(Space::Pio, 0x3f0, 9, DeviceId(9), Stage::Fast)
            .unwrap_err();
        assert!(matches!(
            e,
            BusError::Overlap {
                other_base: 0x3f8,
                ..
            }
        ));
        assert_eq!(format!("{e}"), "port range 0x3f0+0x9 overlaps 0x3f8+0x8");
        assert!(b
            .insert(Space::Pio, 0x3ff, 2, DeviceId(9), Stage::Fast)
            .is_err());
        // Adjacent ranges are fine.
        b.insert(Space::Pio, 0x3f0, 8, DeviceId(9), Stage::Fast)
            .unwrap();
        b.insert(Space::Pio, 0x400, 1, DeviceId(10), Stage::Fast)
            .unwrap();
        b.insert(Space::Pio, 0xffff, 1, DeviceId(11), Stage::Fast)
            .unwrap();
        b.insert(Space::Mmio, u64::MAX, 1, DeviceId(12), Stage::Fast)
            .unwrap();
        assert_eq!(b.route(Space::Mmio, u64::MAX).unwrap().device, DeviceId(12));
    }

    #[test]
    fn table_full_is_an_error_not_a_panic() {
        let mut t = RangeTable::default();
        for i in 0..MAX_RANGES as u64 {
            t.insert(
                Space::Pio,
                BusRange {
                    base: i * 2,
                    len: 1,
                    device: DeviceId(0),
                    stage: Stage::Fast,
                },
            )
            .unwrap();
        }
        let e = t.insert(
            Space::Pio,
            BusRange {
                base: 0x1000,
                len: 1,
                device: DeviceId(0),
                stage: Stage::Fast,
            },
        );
        assert_eq!(e, Err(BusError::Full));
    }

    #[test]
    fn unclaimed_reads_are_all_ones_of_the_width() {
        for w in [1usize, 2, 4, 8] {
            let mut d = [0u8; 8];
            fill_unclaimed(&mut d[..w]);
            assert!(d[..w].iter().all(|&b| b == 0xff));
            assert!(d[w..].iter().all(|&b| b == 0));
        }
    }
}
