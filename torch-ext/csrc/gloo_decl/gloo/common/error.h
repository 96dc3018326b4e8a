// Declarations only: see gloo/README.md.
#pragma once
