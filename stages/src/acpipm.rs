//! ACPI PM1 event/control registers and the reset register (being written).
