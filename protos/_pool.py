"""The descriptor pool that meshserve's generated modules register into.

Other KServe v2 stubs (tritonclient's among them) register the same
`inference.*` message names in protobuf's default pool; two registrations of
one symbol from different files fail at import. A pool of our own lets a
process load meshserve's stubs beside tritonclient's. The wire format does not
depend on the pool.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
