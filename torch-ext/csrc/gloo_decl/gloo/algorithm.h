// Declarations only: see README.md beside this file.
#pragma once
#include "gloo/context.h"
