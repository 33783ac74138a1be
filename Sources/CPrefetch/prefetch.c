/* CPrefetch is header-only (include/dynmoe_prefetch.h); SwiftPM needs one source file. */
