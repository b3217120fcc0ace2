//! Helpers shared by the end-to-end tests: starting real servers and the proxy.
