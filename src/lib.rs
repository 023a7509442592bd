//! moe-hal facade
