#pragma once

// The PKCS#11 header, from p11-kit (Debian libp11-kit-dev): no vendored copy.

#include <p11-kit/pkcs11.h>
