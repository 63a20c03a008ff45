//! PCI addresses as bhyve's `pptdevs` names them (`bus/slot/function`, segment 0).

use std::fmt;

/// Highest PCI device (slot) number on a bus.
pub const MAX_SLOT: u8 = 31;
/// Highest PCI function number in a device.
pub const MAX_FUNCTION: u8 = 7;

/// Why a `bus/slot/function` triple is not a PCI address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// The slot is above [`MAX_SLOT`].
    #[error("Slot {slot} out of range (0..=31)")]
    SlotOutOfRange {
        /// The offending slot number.
        slot: u8,
    },
    /// The function is above [`MAX_FUNCTION`].
    #[error("Function {function} out of range (0..=7)")]
    FunctionOutOfRange {
        /// The offending function number.
        function: u8,
    },
}

/// One PCI function on segment (domain) 0.
///
/// bhyve's `pptdevs` has no notion of a segment, so neither do we: every address lives in
/// segment 0, which Linux spells `0000:` in sysfs. Construction checks the ranges, so a value of
/// this type is always a valid address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    bus: u8,
    slot: u8,
    function: u8,
}

impl PciAddress {
    /// The address `bus/slot/function`; fails when `slot` > 31 or `function` > 7.
    pub fn new(bus: u8, slot: u8, function: u8) -> Result<Self, AddressError> {
        if slot > MAX_SLOT {
            return Err(AddressError::SlotOutOfRange { slot });
        }
        if function > MAX_FUNCTION {
            return Err(AddressError::FunctionOutOfRange { function });
        }
        Ok(Self {
            bus,
            slot,
            function,
        })
    }

    /// The bus number.
    pub fn bus(self) -> u8 {
        self.bus
    }

    /// The device (slot) number, 0..=31.
    pub fn slot(self) -> u8 {
        self.slot
    }

    /// The function number, 0..=7.
    pub fn function(self) -> u8 {
        self.function
    }

    /// The name Linux gives the device in sysfs, e.g. `0000:0a:00.0`.
    pub fn sysfs_name(self) -> String {
        self.to_string()
    }

    /// The address as bhyve's `pptdevs` writes it, e.g. `10/0/0` (decimal).
    pub fn pptdevs_form(self) -> String {
        format!("{}/{}/{}", self.bus, self.slot, self.function)
    }
}

/// Formats as the sysfs name, `0000:BB:SS.F` in hexadecimal.
impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "0000:{:02x}:{:02x}.{:x}",
            self.bus, self.slot, self.function
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_both_notations() {
        let a = PciAddress::new(10, 0, 0).unwrap();
        assert_eq!(a.sysfs_name(), "0000:0a:00.0");
        assert_eq!(a.pptdevs_form(), "10/0/0");
        let b = PciAddress::new(255, 31, 7).unwrap();
        assert_eq!(b.to_string(), "0000:ff:1f.7");
        assert_eq!(b.pptdevs_form(), "255/31/7");
    }

    #[test]
    fn rejects_out_of_range_slot_and_function() {
        assert_eq!(
            PciAddress::new(0, 32, 0),
            Err(AddressError::SlotOutOfRange { slot: 32 })
        );
        assert_eq!(
            PciAddress::new(0, 0, 8),
            Err(AddressError::FunctionOutOfRange { function: 8 })
        );
    }
}
