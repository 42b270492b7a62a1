// Kept so that existing programs keep compiling: this header moved to <lorafuse/peft/inject.h>.
#pragma once
#include <lorafuse/peft/inject.h>
