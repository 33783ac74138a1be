import DynMoECore
