// Kept so that existing programs keep compiling: this header moved to <lorafuse/peft/adapters.h>.
#pragma once
#include <lorafuse/peft/adapters.h>
