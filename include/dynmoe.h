#ifndef DYNMOE_H
#define DYNMOE_H
#endif
